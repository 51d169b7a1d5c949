"""Organisations over HTTP: a service key may do anything; a member's session may do what its
role allows (checked in the same transaction as the change)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field, StrictInt

from tollhouse.api.deps import Caller, CallerDep, TollhouseDep
from tollhouse.api.routes.billing import (
    BillingOut,
    CheckoutBody,
    IdempotencyKey,
    PortalBody,
    UrlOut,
)
from tollhouse.api.schemas import Strict
from tollhouse.app import Tollhouse
from tollhouse.errors import Forbidden, InvalidRequest, OrganisationPermissionDenied
from tollhouse.orgs import Invitation, IssuedInvitation, Member, Organisation

router = APIRouter(tags=["organisations"])

Slug = Annotated[
    str, Field(min_length=3, max_length=63, pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")
]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
LogoUrl = Annotated[str, Field(max_length=2000, pattern=r"^https?://\S+$")]
CreditLimit = Annotated[StrictInt, Field(ge=-1, le=10**15)]
Role = Literal["owner", "admin", "member"]


class OrgCreate(Strict):
    name: Name
    slug: Slug
    logo_url: LogoUrl | None = None
    owner_user_id: uuid.UUID | None = Field(
        default=None, description="Required with a service key; a session creates for itself."
    )


class OrgPatch(Strict):
    name: Name | None = None
    slug: Slug | None = None
    logo_url: LogoUrl | None = None


class OrgOut(BaseModel):
    id: uuid.UUID
    name: str
    slug: str | None
    logo_url: str | None
    owner_user_id: uuid.UUID
    is_personal: bool
    role: Role | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @classmethod
    def of(cls, org: Organisation) -> OrgOut:
        return cls(
            id=org.id,
            name=org.name,
            slug=org.slug,
            logo_url=org.logo_url,
            owner_user_id=org.owner_user_id,
            is_personal=org.is_default,
            role=org.role,
            created_at=org.created_at,
            updated_at=org.updated_at,
            deleted_at=org.deleted_at,
        )


class OrgList(BaseModel):
    organisations: list[OrgOut]


class MemberOut(BaseModel):
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: Role
    email: str | None
    display_name: str | None
    credit_limit: int = Field(description="-1 = unlimited")
    used_credits: int = Field(description="Spent from the pool in its current period")
    remaining_credits: int | None = Field(description="max(0, limit - used); null = unlimited")
    created_at: datetime

    @classmethod
    def of(cls, member: Member) -> MemberOut:
        return cls.model_validate(member, from_attributes=True)


class MemberList(BaseModel):
    members: list[MemberOut]


class MemberAdd(Strict):
    user_id: uuid.UUID
    role: Role = "member"
    credit_limit: CreditLimit = -1


class MemberPatch(Strict):
    role: Role | None = None
    transfer_ownership: bool = Field(
        default=False, description="Make this member the owner of record (owners only)."
    )


class CreditLimitBody(Strict):
    credit_limit: CreditLimit


class InvitationCreate(Strict):
    email: str = Field(min_length=3, max_length=320)
    role: Literal["admin", "member"] = "member"
    credit_limit: CreditLimit = -1


class InvitationOut(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    role: Literal["admin", "member"]
    credit_limit: int
    invited_by: uuid.UUID | None
    status: Literal["pending", "accepted", "revoked", "expired"]
    expires_at: datetime
    created_at: datetime
    accepted_at: datetime | None
    accepted_by: uuid.UUID | None

    @classmethod
    def of(cls, invitation: Invitation) -> InvitationOut:
        return cls(**vars(invitation))


class IssuedOut(BaseModel):
    invitation: InvitationOut
    token: str = Field(description="Shown once; only a hash of it is stored.")

    @classmethod
    def of(cls, issued: IssuedInvitation) -> IssuedOut:
        return cls(invitation=InvitationOut.of(issued.invitation), token=issued.token)


class InvitationList(BaseModel):
    invitations: list[InvitationOut]


class AcceptBody(Strict):
    token: str = Field(min_length=1, max_length=200)
    user_id: uuid.UUID | None = Field(
        default=None, description="With a service key: who accepts. A session accepts for itself."
    )


def _acting(caller_user: uuid.UUID | None, named: uuid.UUID | None, field: str) -> uuid.UUID:
    """The user a request acts for: the session's, or the one a service key names."""
    if caller_user is not None:
        if named is not None and named != caller_user:
            raise Forbidden(f"a session acts only for its own user; drop {field}")
        return caller_user
    if named is None:
        raise InvalidRequest(f"{field} is required with a service key", field=field)
    return named


@router.post(
    "/v1/orgs",
    status_code=status.HTTP_201_CREATED,
    response_model=OrgOut,
    summary="Create an organisation (the creator becomes its owner)",
)
async def create_org(body: OrgCreate, caller: CallerDep, tollhouse: TollhouseDep) -> OrgOut:
    owner = _acting(caller.user_id, body.owner_user_id, "owner_user_id")
    org = await tollhouse.orgs.create(body.name, body.slug, owner, logo_url=body.logo_url)
    return OrgOut.of(org)


@router.get("/v1/orgs/{tenant_id}", response_model=OrgOut, summary="An organisation")
async def get_org(tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep) -> OrgOut:
    org = await tollhouse.orgs.get(
        tenant_id, caller.user_id, include_deleted=caller.user_id is None
    )
    return OrgOut.of(org)


@router.patch(
    "/v1/orgs/{tenant_id}",
    response_model=OrgOut,
    summary="Rename, change the slug or the logo (owners and admins)",
)
async def patch_org(
    tenant_id: uuid.UUID, body: OrgPatch, caller: CallerDep, tollhouse: TollhouseDep
) -> OrgOut:
    org = await tollhouse.orgs.update(
        tenant_id,
        caller.user_id,
        name=body.name,
        slug=body.slug,
        logo_url=body.logo_url,
        set_logo="logo_url" in body.model_fields_set,
    )
    return OrgOut.of(org)


@router.delete(
    "/v1/orgs/{tenant_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Soft-delete an organisation (owners)",
)
async def delete_org(tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep) -> Response:
    await tollhouse.orgs.delete(tenant_id, caller.user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/v1/orgs/{tenant_id}/restore",
    response_model=OrgOut,
    summary="Restore a soft-deleted organisation (owners)",
)
async def restore_org(tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep) -> OrgOut:
    return OrgOut.of(await tollhouse.orgs.restore(tenant_id, caller.user_id))


@router.get("/v1/users/{user_id}/orgs", response_model=OrgList, summary="A user's organisations")
async def user_orgs(user_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep) -> OrgList:
    _acting(caller.user_id, user_id, "user_id")
    orgs = await tollhouse.orgs.for_user(user_id)
    return OrgList(organisations=[OrgOut.of(org) for org in orgs])


@router.get(
    "/v1/orgs/{tenant_id}/members",
    response_model=MemberList,
    summary="Members, with their credit limits and use",
)
async def list_members(
    tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> MemberList:
    members = await tollhouse.orgs.members(tenant_id, caller.user_id)
    return MemberList(members=[MemberOut.of(m) for m in members])


@router.post(
    "/v1/orgs/{tenant_id}/members",
    status_code=status.HTTP_201_CREATED,
    response_model=MemberOut,
    summary="Add an existing user (owners and admins)",
)
async def add_member(
    tenant_id: uuid.UUID, body: MemberAdd, caller: CallerDep, tollhouse: TollhouseDep
) -> MemberOut:
    member = await tollhouse.orgs.add_member(
        tenant_id, body.user_id, body.role, caller.user_id, credit_limit=body.credit_limit
    )
    return MemberOut.of(member)


@router.patch(
    "/v1/orgs/{tenant_id}/members/{user_id}",
    response_model=MemberOut,
    summary="Change a member's role, or transfer ownership to it",
)
async def patch_member(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    body: MemberPatch,
    caller: CallerDep,
    tollhouse: TollhouseDep,
) -> MemberOut:
    if body.transfer_ownership:
        await tollhouse.orgs.transfer_ownership(tenant_id, user_id, caller.user_id)
    elif body.role is not None:
        await tollhouse.orgs.change_role(tenant_id, user_id, body.role, caller.user_id)
    else:
        raise InvalidRequest("nothing to change: give role or transfer_ownership")
    return MemberOut.of(await tollhouse.orgs.member(tenant_id, user_id))


@router.delete(
    "/v1/orgs/{tenant_id}/members/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a member, or leave",
)
async def remove_member(
    tenant_id: uuid.UUID, user_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> Response:
    await tollhouse.orgs.remove_member(tenant_id, user_id, caller.user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/v1/orgs/{tenant_id}/members/{user_id}/credit-limit",
    response_model=MemberOut,
    summary="Set a member's credit limit per period (-1 = unlimited)",
)
async def put_credit_limit(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    body: CreditLimitBody,
    caller: CallerDep,
    tollhouse: TollhouseDep,
) -> MemberOut:
    member = await tollhouse.orgs.set_credit_limit(
        tenant_id, user_id, body.credit_limit, caller.user_id
    )
    return MemberOut.of(member)


@router.post(
    "/v1/orgs/{tenant_id}/invitations",
    status_code=status.HTTP_201_CREATED,
    response_model=IssuedOut,
    summary="Invite an e-mail address (the token is shown once)",
)
async def invite(
    tenant_id: uuid.UUID, body: InvitationCreate, caller: CallerDep, tollhouse: TollhouseDep
) -> IssuedOut:
    issued = await tollhouse.orgs.invite(
        tenant_id, body.email, body.role, caller.user_id, credit_limit=body.credit_limit
    )
    return IssuedOut.of(issued)


@router.get(
    "/v1/orgs/{tenant_id}/invitations",
    response_model=InvitationList,
    summary="Invitations, newest first (owners and admins)",
)
async def list_invitations(
    tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> InvitationList:
    found = await tollhouse.orgs.invitations(tenant_id, caller.user_id)
    return InvitationList(invitations=[InvitationOut.of(i) for i in found])


@router.post(
    "/v1/orgs/{tenant_id}/invitations/{invitation_id}/resend",
    response_model=IssuedOut,
    summary="A new token and expiry for an invitation (the old token stops working)",
)
async def resend_invitation(
    tenant_id: uuid.UUID, invitation_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> IssuedOut:
    return IssuedOut.of(await tollhouse.orgs.resend(tenant_id, invitation_id, caller.user_id))


@router.post(
    "/v1/orgs/{tenant_id}/invitations/{invitation_id}/revoke",
    response_model=InvitationOut,
    summary="Revoke an invitation",
)
async def revoke_invitation(
    tenant_id: uuid.UUID, invitation_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> InvitationOut:
    invitation = await tollhouse.orgs.revoke(tenant_id, invitation_id, caller.user_id)
    return InvitationOut.of(invitation)


@router.post(
    "/v1/invitations/accept",
    response_model=MemberOut,
    summary="Accept an invitation as a signed-in user whose verified e-mail it names",
)
async def accept_invitation(
    body: AcceptBody, caller: CallerDep, tollhouse: TollhouseDep
) -> MemberOut:
    user_id = _acting(caller.user_id, body.user_id, "user_id")
    return MemberOut.of(await tollhouse.orgs.accept(body.token, user_id))


# --- an organisation's billing: the same as a user's, on the organisation's tenant -------------


async def _billable(tollhouse: Tollhouse, tenant_id: uuid.UUID, caller: Caller) -> uuid.UUID:
    """The organisation, if the caller may manage its billing (an owner or admin, or the
    service); a personal tenant is billed through its user."""
    org = await tollhouse.orgs.get(tenant_id, caller.user_id)
    if org.is_default:
        raise InvalidRequest("a personal tenant is billed through /v1/users/{id}")
    if caller.user_id is not None and org.role not in ("owner", "admin"):
        raise OrganisationPermissionDenied(role=org.role)
    return org.id


@router.get(
    "/v1/orgs/{tenant_id}/billing",
    response_model=BillingOut,
    summary="An organisation's plan, subscription, lifetime deal and invoices",
)
async def org_billing(
    tenant_id: uuid.UUID, caller: CallerDep, tollhouse: TollhouseDep
) -> BillingOut:
    await tollhouse.orgs.get(tenant_id, caller.user_id)  # any member may look
    return BillingOut.of(await tollhouse.billing.summary(tenant_id))


@router.post(
    "/v1/orgs/{tenant_id}/checkout",
    response_model=UrlOut,
    summary="A Stripe Checkout Session for the organisation (owners and admins)",
    responses={409: {"description": "already_subscribed, idempotency_conflict"}},
)
async def org_checkout(
    tenant_id: uuid.UUID,
    body: CheckoutBody,
    caller: CallerDep,
    tollhouse: TollhouseDep,
    idempotency_key: IdempotencyKey = None,
) -> UrlOut:
    tenant = await _billable(tollhouse, tenant_id, caller)
    url = await tollhouse.billing.checkout(
        tenant,
        price_id=body.price_id,
        success_url=body.success_url,
        cancel_url=body.cancel_url,
        operation_id=idempotency_key,
    )
    return UrlOut(url=url)


@router.post(
    "/v1/orgs/{tenant_id}/portal",
    response_model=UrlOut,
    summary="A Stripe customer-portal session for the organisation (owners and admins)",
)
async def org_portal(
    tenant_id: uuid.UUID,
    caller: CallerDep,
    tollhouse: TollhouseDep,
    body: PortalBody | None = None,
) -> UrlOut:
    tenant = await _billable(tollhouse, tenant_id, caller)
    url = await tollhouse.billing.portal(tenant, return_url=body.return_url if body else None)
    return UrlOut(url=url)
