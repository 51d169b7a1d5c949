"""Password sign-up and sign-in, throttling, enumeration, tokens (RELIABILITY T-01/T-07/T-08)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from structlog.testing import capture_logs

from tests.support.dump import data_dump
from tollhouse import errors
from tollhouse.app import Tollhouse
from tollhouse.identity.passwords import PasswordHasher

PASSWORD = "correct horse battery"


async def _signup(tollhouse: Tollhouse, email: str = "pat@example.com") -> str:
    sign_in, _ = await tollhouse.auth.sign_up(email, PASSWORD)
    return sign_in.session_token


async def test_sign_up_then_sign_in(tollhouse: Tollhouse) -> None:
    sign_in, verification = await tollhouse.auth.sign_up("Pat@Example.com", PASSWORD, "Pat")
    assert sign_in.created and not sign_in.linked
    assert sign_in.user.primary_email == "pat@example.com"
    assert sign_in.user.emails[0].verified is False
    assert verification.token.startswith("thv_")
    session = await tollhouse.auth.authenticate(sign_in.session_token)
    assert session.user_id == sign_in.user.id
    again = await tollhouse.auth.sign_in_password(" PAT@example.com", PASSWORD, "10.0.0.1")
    assert again.user.id == sign_in.user.id and not again.created


async def test_stored_hash_is_argon2id(dsn: str, tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT password_hash FROM tollhouse.users").fetchone()
    assert row is not None and row[0].startswith("$argon2id$v=19$")


@pytest.mark.parametrize("password", ["short", "x" * 257])
async def test_password_length_bounds(tollhouse: Tollhouse, password: str) -> None:
    with pytest.raises(errors.InvalidPassword):
        await tollhouse.auth.sign_up("q@example.com", password)
    assert await tollhouse.users.find_by_email("q@example.com") is None


async def test_unknown_email_and_wrong_password_look_alike(tollhouse: Tollhouse) -> None:
    """T-08: same error, and the same Argon2 work (a dummy verify for unknown accounts)."""
    await _signup(tollhouse)
    hasher = tollhouse.auth.hasher
    outcomes = []
    for email in ("pat@example.com", "nobody@example.com"):
        before = hasher.verifications
        with pytest.raises(errors.InvalidCredentials) as caught:
            await tollhouse.auth.sign_in_password(email, "wrong password!", "10.0.0.2")
        outcomes.append((caught.value.code, caught.value.message, hasher.verifications - before))
    assert outcomes[0] == outcomes[1] == ("invalid_credentials", outcomes[0][1], 1)


async def test_online_guessing_is_capped_per_account(tollhouse: Tollhouse) -> None:
    """T-07: 1,000 wrong guesses from 50 addresses run at most 20 Argon2 verifications in
    the window, and the owner can still get in another way (soft lock)."""
    await _signup(tollhouse)
    hasher = tollhouse.auth.hasher
    before = hasher.verifications
    throttled = 0
    for attempt in range(1000):
        try:
            await tollhouse.auth.sign_in_password(
                "pat@example.com", f"guess {attempt}", f"192.0.2.{attempt % 50}"
            )
        except errors.TooManySignInAttempts:
            throttled += 1
        except errors.InvalidCredentials:
            pass
    assert hasher.verifications - before <= 20
    assert throttled >= 980
    with pytest.raises(errors.TooManySignInAttempts):
        await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "198.51.100.7")
    reset = await tollhouse.auth.request_password_reset("pat@example.com")
    assert reset is not None  # the owner can still recover the account


async def test_concurrent_guesses_cannot_slip_past_the_limit(tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    hasher = tollhouse.auth.hasher
    before = hasher.verifications
    await asyncio.gather(
        *(
            tollhouse.auth.sign_in_password("pat@example.com", f"guess {i}", f"203.0.113.{i}")
            for i in range(64)
        ),
        return_exceptions=True,
    )
    assert hasher.verifications - before <= 20


async def test_control_a_read_then_write_throttle_lets_concurrent_guesses_through(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """The naive throttle (count, then record) the test above would catch: concurrent
    callers all read a count under the limit before any of them writes."""
    limit = 20
    barrier = asyncio.Barrier(64)

    async def naive_attempt() -> bool:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(attempts), 0) FROM tollhouse.signin_attempts WHERE key = 'k'"
            )
            row = await cur.fetchone()
            await barrier.wait()
            if row is None or row[0] >= limit:
                return False
            await conn.execute(
                "INSERT INTO tollhouse.signin_attempts VALUES ('k', now(), 1)"
                " ON CONFLICT (key, window_start) DO UPDATE"
                " SET attempts = tollhouse.signin_attempts.attempts + 1"
            )
            return True

    allowed = await asyncio.gather(*(naive_attempt() for _ in range(64)))
    assert sum(allowed) > limit


async def test_successful_sign_in_resets_the_account_counter(tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    for i in range(19):
        with pytest.raises(errors.InvalidCredentials):
            await tollhouse.auth.sign_in_password("pat@example.com", f"bad {i}", f"10.1.0.{i}")
    await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "10.2.0.1")
    for i in range(19):
        with pytest.raises(errors.InvalidCredentials):
            await tollhouse.auth.sign_in_password("pat@example.com", f"bad {i}", f"10.3.0.{i}")


async def test_hash_with_old_parameters_is_upgraded_on_sign_in(
    dsn: str, tollhouse: Tollhouse
) -> None:
    await _signup(tollhouse)
    old_hash = await PasswordHasher("owasp-minimum").hash(PASSWORD)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE tollhouse.users SET password_hash = %s", (old_hash,))
    await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "10.0.0.3")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT password_hash FROM tollhouse.users").fetchone()
    assert row is not None and row[0] != old_hash and "m=64,t=1,p=1" in row[0]


async def test_disabled_and_deleted_accounts_cannot_sign_in(tollhouse: Tollhouse) -> None:
    sign_in, _ = await tollhouse.auth.sign_up("s@example.com", PASSWORD)
    await tollhouse.users.update(sign_in.user.id, {"status": "suspended"})
    with pytest.raises(errors.AccountDisabled):
        await tollhouse.auth.sign_in_password("s@example.com", PASSWORD, "10.0.0.4")
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(sign_in.session_token)


async def test_change_password_ends_other_sessions(tollhouse: Tollhouse) -> None:
    first = await _signup(tollhouse)
    second = await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "10.0.0.5")
    session = await tollhouse.auth.authenticate(second.session_token)
    with pytest.raises(errors.InvalidCredentials):
        await tollhouse.auth.change_password(session, "wrong password", "new password 1")
    await tollhouse.auth.change_password(session, PASSWORD, "new password 1")
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(first)
    await tollhouse.auth.authenticate(second.session_token)  # the caller's own stays
    await tollhouse.auth.sign_in_password("pat@example.com", "new password 1", "10.0.0.5")


async def test_reset_password_is_single_use_and_ends_every_session(tollhouse: Tollhouse) -> None:
    session_token = await _signup(tollhouse)
    assert await tollhouse.auth.request_password_reset("unknown@example.com") is None
    issued = await tollhouse.auth.request_password_reset("pat@example.com")
    assert issued is not None
    user = await tollhouse.auth.reset_password(issued.token, "brand new password")
    assert user.emails[0].verified  # the reset proved the mailbox
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(session_token)
    with pytest.raises(errors.TokenUsed):
        await tollhouse.auth.reset_password(issued.token, "another new password")
    with pytest.raises(errors.InvalidToken):
        await tollhouse.auth.reset_password(issued.token[:-2] + "xx", "another new password")
    with pytest.raises(errors.InvalidToken):
        await tollhouse.auth.reset_password("thr_garbage", "another new password")
    await tollhouse.auth.sign_in_password("pat@example.com", "brand new password", "10.0.0.6")


async def test_a_newer_reset_token_retires_the_older(tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    first = await tollhouse.auth.request_password_reset("pat@example.com")
    second = await tollhouse.auth.request_password_reset("pat@example.com")
    assert first is not None and second is not None
    with pytest.raises(errors.TokenUsed):
        await tollhouse.auth.reset_password(first.token, "brand new password")
    await tollhouse.auth.reset_password(second.token, "brand new password")


async def test_expired_tokens_are_refused(dsn: str, tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    issued = await tollhouse.auth.request_password_reset("pat@example.com")
    assert issued is not None
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE tollhouse.user_tokens SET expires_at = now() - interval '1 second'")
    with pytest.raises(errors.TokenExpired):
        await tollhouse.auth.reset_password(issued.token, "brand new password")


async def test_concurrent_uses_of_one_token_succeed_once(tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    issued = await tollhouse.auth.request_password_reset("pat@example.com")
    assert issued is not None
    results = await asyncio.gather(
        *(tollhouse.auth.reset_password(issued.token, f"new password {i}") for i in range(8)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, errors.TokenUsed) for r in results if isinstance(r, BaseException))


async def test_verifying_an_address_ends_sessions_made_before(tollhouse: Tollhouse) -> None:
    """A-04: whoever held a session on a pre-created account loses it at the claim."""
    sign_in, verification = await tollhouse.auth.sign_up("v@example.com", PASSWORD)
    user = await tollhouse.auth.verify_email(verification.token)
    assert user.emails[0].verified
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(sign_in.session_token)
    with pytest.raises(errors.TokenUsed):
        await tollhouse.auth.verify_email(verification.token)


async def test_sign_out(tollhouse: Tollhouse) -> None:
    token = await _signup(tollhouse)
    await tollhouse.auth.sign_out(token)
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(token)
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate("ths_not_a_token")


async def test_raw_tokens_never_reach_the_database_or_the_logs(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """T-01: a full dump and the captured logs hold none of 102 issued tokens."""
    issued: list[str] = []
    with capture_logs() as logs:
        for i in range(34):
            sign_in, verification = await tollhouse.auth.sign_up(f"t{i}@example.com", PASSWORD)
            reset = await tollhouse.auth.request_password_reset(f"t{i}@example.com")
            assert reset is not None
            issued += [sign_in.session_token, verification.token, reset.token]
            await tollhouse.auth.authenticate(sign_in.session_token)
    logged = repr(logs)
    assert all(len(t.rsplit(".", 1)[1]) == 43 for t in issued)  # 256-bit secrets
    dump = data_dump(dsn)
    assert "t0@example.com" in dump  # the dump is real
    leaked = [t for t in issued if t.rsplit(".", 1)[1] in dump + logged]
    assert leaked == []


async def test_concurrent_sign_ups_of_one_address_make_one_account(tollhouse: Tollhouse) -> None:
    variants = ["race@example.com", "RACE@example.com", " Race@Example.com "] * 3
    results = await asyncio.gather(
        *(tollhouse.auth.sign_up(v, PASSWORD) for v in variants), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, errors.EmailTaken) for r in results if isinstance(r, BaseException))


async def test_successful_sign_ins_do_not_fill_the_address_limit(tollhouse: Tollhouse) -> None:
    """The per-address limit counts failures: one office behind one address can sign in."""
    await _signup(tollhouse)
    for _ in range(30):
        await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "192.0.2.200")


async def test_a_reset_lifts_the_guessing_lock(tollhouse: Tollhouse) -> None:
    await _signup(tollhouse)
    for i in range(25):
        with pytest.raises((errors.InvalidCredentials, errors.TooManySignInAttempts)):
            await tollhouse.auth.sign_in_password("pat@example.com", f"guess {i}", None)
    issued = await tollhouse.auth.request_password_reset("pat@example.com")
    assert issued is not None
    await tollhouse.auth.reset_password(issued.token, "brand new password")
    await tollhouse.auth.sign_in_password("pat@example.com", "brand new password", None)


async def test_reauthentication_is_throttled(tollhouse: Tollhouse) -> None:
    token = await _signup(tollhouse)
    session = await tollhouse.auth.authenticate(token)
    before = tollhouse.auth.hasher.verifications
    for i in range(40):
        with pytest.raises((errors.InvalidCredentials, errors.TooManySignInAttempts)):
            await tollhouse.auth.reauthenticate(session, f"guess {i}")
    assert tollhouse.auth.hasher.verifications - before <= 20


async def test_reset_through_an_unproven_address_beside_other_ways_in_is_refused(
    tollhouse: Tollhouse,
) -> None:
    """A stranger's address planted unverified in a proven account must not open it."""
    owner, verification = await tollhouse.auth.sign_up("owner@example.com", PASSWORD)
    await tollhouse.auth.verify_email(verification.token)
    await tollhouse.users.add_email(owner.user.id, "planted@example.com")
    assert await tollhouse.auth.request_password_reset("planted@example.com") is None
    assert await tollhouse.auth.request_password_reset("owner@example.com") is not None
    # A sole unverified address is the whole account: its reset is the way to prove it.
    await tollhouse.auth.sign_up("alone@example.com", PASSWORD)
    assert await tollhouse.auth.request_password_reset("alone@example.com") is not None


async def test_concurrent_sign_ins_during_a_rehash_all_succeed(
    dsn: str, tollhouse: Tollhouse
) -> None:
    await _signup(tollhouse)
    old_hash = await PasswordHasher("owasp-minimum").hash(PASSWORD)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE tollhouse.users SET password_hash = %s", (old_hash,))
    results = await asyncio.gather(
        *(tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, None) for _ in range(6))
    )
    assert len(results) == 6


async def test_nul_bytes_are_bad_input_not_a_crash(tollhouse: Tollhouse) -> None:
    with pytest.raises(errors.InvalidRequest):
        await tollhouse.auth.sign_up("nul@example.com", PASSWORD, "bad\x00name")
    await _signup(tollhouse)
    with pytest.raises(errors.InvalidRequest):
        await tollhouse.auth.sign_in_password("pat@example.com", PASSWORD, "10.0.0.1\x00")
