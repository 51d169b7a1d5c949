"""Users, e-mails, roles and preferences through the service layer."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from tollhouse import errors
from tollhouse.app import Tollhouse


async def test_a_new_user_gets_everything_in_one_transaction(
    dsn: str, tollhouse: Tollhouse
) -> None:
    user = await tollhouse.users.create(email="  Ada@Example.COM ", display_name="Ada")
    assert user.primary_email == "ada@example.com"
    assert [(e.email, e.is_primary, e.verified) for e in user.emails] == [
        ("ada@example.com", True, False)
    ]
    assert user.roles == ["user"]
    assert user.effective_plan == "free"
    assert user.status == "active"
    assert user.personal_tenant_id is not None
    prefs = await tollhouse.users.preferences(user.id)
    assert (prefs.marketing, prefs.product_updates, prefs.payment_receipts) == (True, True, True)
    with psycopg.connect(dsn) as conn:
        member = conn.execute(
            "SELECT t.is_default, m.role FROM tollhouse.tenants t"
            " JOIN tollhouse.tenant_members m ON m.tenant_id = t.id WHERE m.user_id = %s",
            (user.id,),
        ).fetchall()
    assert member == [(True, "owner")]


async def test_a_failed_creation_writes_nothing(dsn: str, tollhouse: Tollhouse) -> None:
    await tollhouse.users.create(email="ada@example.com")
    with pytest.raises(errors.EmailTaken):
        await tollhouse.users.create(email="ADA@example.com", display_name="twin")
    with psycopg.connect(dsn) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM tollhouse.users),"
            " (SELECT count(*) FROM tollhouse.tenants),"
            " (SELECT count(*) FROM tollhouse.user_email_preferences)"
        ).fetchone()
    assert counts == (1, 1, 1)


async def test_concurrent_creations_in_different_case_make_one_user(tollhouse: Tollhouse) -> None:
    variants = ["bob@example.com", "BOB@example.com", " Bob@Example.com", "bob@EXAMPLE.COM "] * 3
    results = await asyncio.gather(
        *(tollhouse.users.create(email=v) for v in variants), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    assert len(created) == 1
    assert all(isinstance(r, errors.EmailTaken) for r in results if isinstance(r, BaseException))


async def test_plus_tags_and_dots_are_different_addresses(tollhouse: Tollhouse) -> None:
    a = await tollhouse.users.create(email="alice@x.com")
    b = await tollhouse.users.create(email="alice+1@x.com")
    c = await tollhouse.users.create(email="a.lice@x.com")
    assert len({a.id, b.id, c.id}) == 3
    found = await tollhouse.users.find_by_email(" ALICE@x.com")
    assert found is not None and found.id == a.id


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "no-at-sign",
        "a@b",
        "a b@example.com",
        "a@-example.com",
        "x" * 65 + "@example.com",
        "a@" + "b" * 250 + ".com",
        "a@exa\nmple.com",
        "a@example.com\x00",
        "\u00e9@example.com",
        # The Kelvin sign lower-cases to an ASCII "k": a look-alike of kelly@example.com.
        "\u212aelly@example.com",
        "kelly@\u212a.example.com",
    ],
)
async def test_invalid_addresses_are_refused(tollhouse: Tollhouse, bad: str) -> None:
    with pytest.raises(errors.InvalidEmail):
        await tollhouse.users.create(email=bad)


async def test_update_soft_delete_and_restore(tollhouse: Tollhouse) -> None:
    user = await tollhouse.users.create(email="c@example.com")
    updated = await tollhouse.users.update(
        user.id, {"display_name": "Cee", "plan_override": "pro", "metadata": {"team": "a"}}
    )
    assert (updated.display_name, updated.effective_plan, updated.metadata) == (
        "Cee",
        "pro",
        {"team": "a"},
    )
    assert updated.username is None  # fields not named stay as they were
    deleted = await tollhouse.users.delete(user.id)
    assert deleted.deleted_at is not None
    with pytest.raises(errors.UserNotFound):
        await tollhouse.users.get(user.id)
    assert await tollhouse.users.find_by_email("c@example.com") is None
    restored = await tollhouse.users.restore(user.id)
    assert restored.deleted_at is None
    with pytest.raises(errors.UserNotFound):
        await tollhouse.users.restore(user.id)


async def test_profile_rules_are_enforced_by_the_database(tollhouse: Tollhouse) -> None:
    user = await tollhouse.users.create(email="d@example.com")
    other = await tollhouse.users.create(email="e@example.com")
    await tollhouse.users.update(user.id, {"username": "Dee"})
    with pytest.raises(errors.UsernameTaken):
        await tollhouse.users.update(other.id, {"username": "dee"})
    with pytest.raises(errors.InvalidProfile):
        await tollhouse.users.update(other.id, {"username": "no spaces allowed"})
    with pytest.raises(errors.InvalidProfile):
        await tollhouse.users.update(other.id, {"status": "banana"})
    with pytest.raises(errors.InvalidProfile):
        await tollhouse.users.update(other.id, {"password_hash": "x"})


async def test_emails_exactly_one_primary(tollhouse: Tollhouse) -> None:
    user = await tollhouse.users.create(email="p@example.com")
    user = await tollhouse.users.add_email(user.id, "second@example.com")
    assert [e.email for e in user.emails if e.is_primary] == ["p@example.com"]
    with pytest.raises(errors.EmailNotVerified):
        await tollhouse.users.make_primary(user.id, "second@example.com")
    await tollhouse.users.add_email(user.id, "third@example.com", verified=True)
    user = await tollhouse.users.make_primary(user.id, "third@example.com")
    assert [e.email for e in user.emails if e.is_primary] == ["third@example.com"]
    with pytest.raises(errors.PrimaryEmailRequired):
        await tollhouse.users.remove_email(user.id, "third@example.com")
    user = await tollhouse.users.remove_email(user.id, "p@example.com")
    assert {e.email for e in user.emails} == {"second@example.com", "third@example.com"}
    # The removed address is free for someone else.
    await tollhouse.users.create(email="p@example.com")
    with pytest.raises(errors.EmailTaken):
        await tollhouse.users.add_email(user.id, "p@example.com")
    with pytest.raises(errors.EmailNotFound):
        await tollhouse.users.remove_email(user.id, "nobody@example.com")


async def test_roles_and_preferences(tollhouse: Tollhouse) -> None:
    user = await tollhouse.users.create(email="r@example.com")
    user = await tollhouse.users.set_role(user.id, "admin")
    assert user.roles == ["admin", "user"]
    user = await tollhouse.users.set_role(user.id, "admin")  # idempotent
    user = await tollhouse.users.set_role(user.id, "user", granted=False)
    assert user.roles == ["admin"]
    with pytest.raises(errors.InvalidRequest):
        await tollhouse.users.set_role(user.id, "emperor")
    prefs = await tollhouse.users.update_preferences(user.id, {"marketing": False})
    assert (prefs.marketing, prefs.product_updates) == (False, True)
    with pytest.raises(errors.UserNotFound):
        await tollhouse.users.set_role(uuid.uuid4(), "admin")


async def test_a_primary_change_racing_a_removal_keeps_exactly_one_primary(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """Another transaction deletes the address being made primary and commits while the
    change waits: the change must see that, not leave the user with no primary at all."""
    user = await tollhouse.users.create(email="one@example.com", email_verified=True)
    await tollhouse.users.add_email(user.id, "x@example.com", verified=True)
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        async with other.transaction():
            await other.execute("DELETE FROM tollhouse.user_emails WHERE email = 'x@example.com'")
            change = asyncio.create_task(tollhouse.users.make_primary(user.id, "x@example.com"))
            await asyncio.sleep(0.5)  # the change reaches the locked rows and waits
        outcome = await asyncio.gather(change, return_exceptions=True)
    assert isinstance(outcome[0], errors.EmailNotFound)
    final = await tollhouse.users.get(user.id)
    assert [e.email for e in final.emails if e.is_primary] == ["one@example.com"]
