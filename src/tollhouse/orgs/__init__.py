"""Organisations: tenants with members, roles, invitations and per-member credit limits."""

from tollhouse.orgs.records import Invitation, IssuedInvitation, Member, Organisation
from tollhouse.orgs.service import OrgService

__all__ = ["Invitation", "IssuedInvitation", "Member", "OrgService", "Organisation"]
