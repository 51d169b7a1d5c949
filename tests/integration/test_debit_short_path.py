"""The debit's short path (`tollhouse.api.debit`): it answers exactly as the FastAPI route
does, for every outcome, error and malformed request (those go on to the route); it skips
FastAPI's routing and dependencies; it is counted under the route."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from fastapi import FastAPI

from tests.support.asgi import Answer, metrics_and_openapi, post
from tollhouse.api import create_app
from tollhouse.api.deps import get_tollhouse
from tollhouse.app import Tollhouse
from tollhouse.errors import DatabaseUnavailable

REQUEST_ID = {"X-Request-ID": "req-debit-path"}  # the same id both ways, so headers compare
JSON = {"Content-Type": "application/json"}
NOBODY = "0190a000-0000-7000-8000-000000000000"


async def exchange(
    app: FastAPI, content: Any, headers: dict[str, str], root_path: str = ""
) -> Answer:
    return await post(app, "/v1/credits/debit", content, {**REQUEST_ID, **headers}, root_path)


@pytest.fixture
def apps(tollhouse: Tollhouse) -> tuple[FastAPI, FastAPI]:
    return create_app(tollhouse), create_app(tollhouse, debit_short_path=False)


async def _twin(tollhouse: Tollhouse) -> tuple[str, str]:
    user = await tollhouse.users.create(email=f"{uuid.uuid4().hex[:12]}@example.com")
    assert user.personal_tenant_id is not None
    return str(user.id), str(user.personal_tenant_id)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _steps(user: str, tenant: str, tag: str, key: str) -> list[tuple[Any, dict[str, str]]]:
    """The same requests for either path: `tag` ("path-a" or "path-b") goes into turn ids."""
    auth = {"Authorization": f"Bearer {key}", **JSON}

    def body(**fields: Any) -> str:
        return json.dumps({"user_id": user, "amount": 10, "turn_id": f"{tag}-1", **fields})

    return [
        (body(session_id="s-1", metadata={"model": "m", "n": [1, 2.5, None]}), auth),
        (body(session_id="s-1", metadata={"model": "m", "n": [1, 2.5, None]}), auth),  # replay
        (body(amount=11), auth),  # idempotency conflict
        (body(turn_id=f"{tag}-2", amount=20), auth),  # over the free plan's daily cap
        (body(turn_id=f"{tag}-2", amount=20), auth),  # its sticky replay
        (body(turn_id=f"{tag}-3", user_id=NOBODY), auth),  # unknown payer
        (
            json.dumps({"tenant_id": tenant, "amount": 2, "turn_id": f"{tag}-4"}),
            {**auth, "Content-Type": "application/json; charset=utf-8"},
        ),
        (body(turn_id=f"{tag}-5", amount=1, metadata={"pad": "x" * 70_000}), auth),  # > 64 KiB
        (body(turn_id=f"{tag}-6", amount=1.5), auth),
        (body(turn_id=f"{tag}-6", amount=0), auth),
        (body(turn_id=f"{tag}-6", amount=-1), auth),
        (body(turn_id=f"{tag}-6", amount="1"), auth),
        (body(turn_id=f"{tag}-6", amount=True), auth),
        (body(turn_id=f"{tag}-6", user_id="not-a-uuid"), auth),
        (json.dumps({"amount": 1, "turn_id": f"{tag}-6"}), auth),  # no payer
        (body(turn_id=f"{tag}-6", extra=1), auth),
        (body(turn_id=f"{tag}-6", reason="Bad Reason"), auth),
        (body(turn_id=f"{tag}-6", metadata=[1]), auth),
        (body(turn_id=f"{tag}-6").replace("}", ', "metadata": {"x": ' + nested(70) + "}}"), auth),
        (body(turn_id=f"{tag}-6").replace("}", ', "metadata": {"x": ' + nested(950) + "}}"), auth),
        (body(turn_id=f"{tag}-6").replace("}", ', "metadata": {"x": ' + nested(5000) + "}}"), auth),
        (body(turn_id=""), auth),
        (body(turn_id=f"{tag}-\u0000"), auth),
        (body(turn_id=f"{tag}-6").replace("}", ', "metadata": {"x": NaN}}'), auth),
        (body(turn_id=f"{tag}-6").replace("}", ', "session_id": "\\ud800"}'), auth),
        ("{", auth),
        ("", auth),
        ("null", auth),
        ("[]", auth),
        (body(turn_id=f"{tag}-7"), JSON),  # no key
        (body(turn_id=f"{tag}-7"), {"Authorization": "Bearer th_live_unknown", **JSON}),
        (body(turn_id=f"{tag}-7"), {"Authorization": f"Basic {key}", **JSON}),
        (body(turn_id=f"{tag}-7"), {"Authorization": "Bearer", **JSON}),
        (body(turn_id=f"{tag}-7"), {**auth, "Content-Type": "text/plain"}),
        (body(turn_id=f"{tag}-7"), {"Authorization": f"bearer {key}", **JSON}),
    ]


def _normal(answer: Answer, user: str, tenant: str, tag: str) -> Answer:
    status, headers, body = answer
    text = body.decode().replace(user, "<user>").replace(tenant, "<tenant>").replace(tag, "<tag>")
    text = re.sub(r'"ledger_id":"[0-9a-f-]{36}"', '"ledger_id":"<id>"', text)
    return status, headers, text.encode()


async def test_the_short_path_answers_as_the_route_does(
    apps: tuple[FastAPI, FastAPI], tollhouse: Tollhouse, service_key: str
) -> None:
    """Twin payers, one per path, the same requests in the same order: the same statuses,
    headers and bodies (ids aside), request by request."""
    answers: list[list[Answer]] = []
    for app, tag in zip(apps, ("path-a", "path-b"), strict=True):
        user, tenant = await _twin(tollhouse)
        answers.append(
            [
                _normal(await exchange(app, content, headers), user, tenant, tag)
                for content, headers in _steps(user, tenant, tag, service_key)
            ]
        )
    for number, (got, expected) in enumerate(zip(*answers, strict=True)):
        assert got == expected, f"request {number}"
    statuses = [status for status, _, _ in answers[0]]
    assert statuses[:8] == [200, 200, 409, 429, 429, 404, 200, 200]
    assert 200 not in statuses[8:-1] and statuses[-1] == 200  # "bearer" in lower case is fine
    assert set(statuses[8:]) >= {400, 401, 415, 422}
    replayed = [(b"idempotent-replayed", b"true") in headers for _, headers, _ in answers[0]]
    assert replayed[:5] == [False, True, False, False, True]


async def test_server_side_failures_answer_as_the_route_does(
    apps: tuple[FastAPI, FastAPI],
    tollhouse: Tollhouse,
    service_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A domain error of the 5xx kind (its request id in the body) and an unexpected error
    (the last net's 500): the same answers both ways."""

    async def unavailable(request: Any) -> Any:
        raise DatabaseUnavailable("the pool is closed")

    async def broken(request: Any) -> Any:
        raise RuntimeError("internals")

    user, _ = await _twin(tollhouse)
    content = json.dumps({"user_id": user, "amount": 1, "turn_id": "fails"})
    headers = {"Authorization": f"Bearer {service_key}", **JSON}
    for failure, status in ((unavailable, 503), (broken, 500)):
        monkeypatch.setattr(tollhouse.credits, "debit", failure)
        got, expected = [await exchange(app, content, headers) for app in apps]
        assert got == expected
        assert got[0] == status
        assert json.loads(got[2])["error"]["request_id"] == "req-debit-path"
    monkeypatch.undo()

    # The key cannot be looked up: the route answers (503), for a valid body and an invalid one.
    async def no_keys(secret: str) -> Any:
        raise DatabaseUnavailable("the pool is closed")

    monkeypatch.setattr(tollhouse.keys, "authenticate", no_keys)
    for sent, status in ((content, 503), ("{", 400), ('{"amount": 1}', 503)):
        got, expected = [await exchange(app, sent, headers) for app in apps]
        assert got == expected
        assert got[0] == status


async def test_mounted_under_a_root_path_routing_decides(
    apps: tuple[FastAPI, FastAPI], tollhouse: Tollhouse, service_key: str
) -> None:
    """Under a root path the route's path differs from the raw one: the short path stands
    aside, and both answer what routing answers (no debit)."""
    user, _ = await _twin(tollhouse)
    content = json.dumps({"user_id": user, "amount": 1, "turn_id": "mounted"})
    headers = {"Authorization": f"Bearer {service_key}", **JSON}
    answers = [await exchange(app, content, headers, root_path="/v1") for app in apps]
    assert answers[0] == answers[1]
    assert answers[0][0] == 404
    assert (await tollhouse.credits.balance(user_id=uuid.UUID(user))).balance == 100


async def test_the_short_path_skips_routing_and_dependencies(
    tollhouse: Tollhouse, service_key: str
) -> None:
    """With FastAPI's dependency failing, the short path still answers (it never solves
    dependencies) and the route does not; both are counted under the route's label, and
    the route is still published."""

    def no_dependencies() -> Tollhouse:
        raise RuntimeError("FastAPI's dependencies were solved")

    short, route = create_app(tollhouse), create_app(tollhouse, debit_short_path=False)
    for app in (short, route):
        app.dependency_overrides[get_tollhouse] = no_dependencies
    user, _ = await _twin(tollhouse)
    headers = {"Authorization": f"Bearer {service_key}", **JSON}
    first = json.dumps({"user_id": user, "amount": 1, "turn_id": "skips-1"})
    second = json.dumps({"user_id": user, "amount": 1, "turn_id": "skips-2"})
    assert (await exchange(short, first, headers))[0] == 200
    assert (await exchange(route, second, headers))[0] == 500
    metrics, spec = await metrics_and_openapi(short)
    label = 'method="POST",route="/v1/credits/debit",status="200"'
    assert f"tollhouse_http_requests_total{{{label}}} 1.0" in metrics
    assert "post" in spec["paths"]["/v1/credits/debit"]
