"""What the organisations service returns."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Role = Literal["owner", "admin", "member"]
InviteRole = Literal["admin", "member"]
InvitationStatus = Literal["pending", "accepted", "revoked", "expired"]
UNLIMITED = -1


@dataclass(frozen=True)
class Organisation:
    """A tenant with members. `role` is the asking user's role in it (None for the service)."""

    id: uuid.UUID
    name: str
    slug: str | None
    logo_url: str | None
    owner_user_id: uuid.UUID
    is_default: bool
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    role: Role | None


@dataclass(frozen=True)
class Member:
    """A member with its credit limit (-1 = unlimited) and its use in the pool's period."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: Role
    created_at: datetime
    email: str | None
    display_name: str | None
    credit_limit: int
    used_credits: int

    @property
    def remaining_credits(self) -> int | None:
        """What the member may still spend this period: never negative; None = no limit."""
        if self.credit_limit == UNLIMITED:
            return None
        return max(0, self.credit_limit - self.used_credits)


@dataclass(frozen=True)
class Invitation:
    """An invitation, without its token (only a hash of it is stored)."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    email: str
    role: InviteRole
    credit_limit: int
    invited_by: uuid.UUID | None
    status: InvitationStatus
    expires_at: datetime
    created_at: datetime
    accepted_at: datetime | None
    accepted_by: uuid.UUID | None


@dataclass(frozen=True)
class IssuedInvitation:
    """An invitation just made or resent: the only time its token exists outside the caller."""

    invitation: Invitation
    token: str
