"""The webhook's short path (`tollhouse.api.webhook`): it answers exactly as the FastAPI
route does, byte for byte, for every outcome; it skips FastAPI's routing and dependencies;
it is counted and logged under the route; and the receiver's batches are in /metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.support import fake_stripe as fs
from tests.support.asgi import Answer, metrics_and_openapi, post
from tollhouse.api import create_app
from tollhouse.api.deps import get_tollhouse
from tollhouse.app import Tollhouse
from tollhouse.billing import BillingConfig
from tollhouse.errors import DatabaseUnavailable

REQUEST_ID = {"X-Request-ID": "req-short-path"}  # the same id both ways, so headers compare


async def exchange(
    app: FastAPI, content: Any, headers: dict[str, str], root_path: str = ""
) -> Answer:
    return await post(app, "/v1/stripe/webhook", content, {**REQUEST_ID, **headers}, root_path)


def signed(event: dict[str, Any], **sign: Any) -> tuple[str, dict[str, str]]:
    body = json.dumps(event)
    return body, fs.sign(body, **sign)


#: Each case makes its request from a tag ("short" or "route", the same length) that goes
#: into its ids, so each path meets new events and the answers compare after swapping tags.
CASES: dict[str, Callable[[str], tuple[Any, dict[str, str]]]] = {
    "ignored, non-ASCII type": lambda tag: signed(
        fs.event("fü.bär", {"id": "x"}, event_id=f"evt_{tag}_1")
    ),
    "parked": lambda tag: signed(
        fs.event(
            "customer.subscription.updated",
            fs.subscription(f"sub_{tag}", f"cus_{tag}", fs.price(f"price_{tag}"), start=1, end=2),
            event_id=f"evt_{tag}_2",
        )
    ),
    "failed with its reason": lambda tag: signed(
        fs.event(
            "price.created",
            fs.price(f"price_{tag}_bad", tollhouse_plan="no_such_plan"),
            event_id=f"evt_{tag}_3",
        )
    ),
    "other secret (rotation)": lambda tag: signed(
        fs.event("foo.bar", {"id": "y"}, event_id=f"evt_{tag}_4"), secret=fs.OTHER_SECRET
    ),
    "wrong secret": lambda tag: signed(
        fs.event("foo.bar", {"id": "z"}, event_id=f"evt_{tag}_5"), secret="whsec_wrong"
    ),
    "old timestamp": lambda tag: signed(
        fs.event("foo.bar", {"id": "z"}, event_id=f"evt_{tag}_6"), timestamp=1_000_000
    ),
    "no signature": lambda tag: (
        json.dumps(fs.event("foo.bar", {}, event_id=f"evt_{tag}_7")),
        {"Content-Type": "application/json"},
    ),
    "malformed signature": lambda tag: (
        "{}",
        {"Stripe-Signature": "t=x,v1=y", "Content-Type": "application/json"},
    ),
    "signed, not an event": lambda tag: (
        json.dumps({"id": f"evt_{tag}_8"}),
        fs.sign(json.dumps({"id": f"evt_{tag}_8"})),
    ),
    "signed, not JSON": lambda tag: (f"[{tag}", fs.sign(f"[{tag}")),
    "declared too large": lambda tag: (
        b"{}",
        {"Content-Length": str(2 << 20), "Content-Type": "application/json"},
    ),
    "not JSON content": lambda tag: ("{}", {"Content-Type": "text/plain"}),
}


def same(answer: Answer) -> Answer:
    status, headers, body = answer
    return status, headers, body.replace(b"short", b"route")


@pytest.fixture
def apps(tollhouse: Tollhouse) -> tuple[FastAPI, FastAPI]:
    return create_app(tollhouse), create_app(tollhouse, webhook_short_path=False)


@pytest.mark.parametrize("case", list(CASES))
async def test_the_short_path_answers_as_the_route_does(
    apps: tuple[FastAPI, FastAPI], case: str
) -> None:
    short, route = apps
    got = await exchange(short, *CASES[case]("short"))
    expected = await exchange(route, *CASES[case]("route"))
    assert same(got) == expected
    assert (b"x-request-id", b"req-short-path") in got[1]


async def test_a_repeated_delivery_answers_duplicate_both_ways(
    apps: tuple[FastAPI, FastAPI],
) -> None:
    answers = []
    for app, tag in zip(apps, ("short", "route"), strict=True):
        body, headers = signed(fs.event("foo.bar", {"id": "d"}, event_id=f"evt_{tag}_dup"))
        await exchange(app, body, headers)
        answers.append(await exchange(app, body, headers))
    assert same(answers[0]) == answers[1]
    assert json.loads(answers[1][2])["status"] == "duplicate"


async def test_server_side_failures_answer_as_the_route_does(
    apps: tuple[FastAPI, FastAPI], tollhouse: Tollhouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain error of the 5xx kind (its request id in the body), an unexpected error (the
    last net's 500), and a service with no secret (503): the same answers both ways."""

    async def unavailable(body: bytes, signature: str | None) -> Any:
        raise DatabaseUnavailable("the pool is closed")

    async def broken(body: bytes, signature: str | None) -> Any:
        raise RuntimeError("internals")

    body, headers = signed(fs.event("foo.bar", {"id": "e"}))
    for failure, status in ((unavailable, 503), (broken, 500)):
        monkeypatch.setattr(tollhouse.billing, "receive", failure)
        got, expected = [await exchange(app, body, headers) for app in apps]
        assert got == expected
        assert got[0] == status
        assert json.loads(got[2])["error"]["request_id"] == "req-short-path"
    monkeypatch.undo()

    unconfigured = Tollhouse(tollhouse.db, billing=BillingConfig())
    got, expected = [
        await exchange(create_app(unconfigured, webhook_short_path=on), body, headers)
        for on in (True, False)
    ]
    assert got == expected
    assert json.loads(got[2])["error"]["code"] == "webhook_not_configured"


async def test_a_body_streamed_past_the_limit_is_cut_off_both_ways(
    apps: tuple[FastAPI, FastAPI],
) -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    answers = [await exchange(app, chunks(), {"Content-Type": "application/json"}) for app in apps]
    assert answers[0] == answers[1]
    assert json.loads(answers[0][2])["error"]["code"] == "invalid_payload"


async def test_the_short_path_skips_routing_and_dependencies(tollhouse: Tollhouse) -> None:
    """With FastAPI's dependency failing, the short path still answers (it never solves
    dependencies) and the route does not; both are counted under the route's label."""

    def no_dependencies() -> Tollhouse:
        raise RuntimeError("FastAPI's dependencies were solved")

    short, route = create_app(tollhouse), create_app(tollhouse, webhook_short_path=False)
    for app in (short, route):
        app.dependency_overrides[get_tollhouse] = no_dependencies
    body, headers = signed(fs.event("foo.bar", {"id": "s"}))
    assert (await exchange(short, body, headers))[0] == 200
    assert (await exchange(route, body, headers))[0] == 500
    metrics, spec = await metrics_and_openapi(short)
    label = 'method="POST",route="/v1/stripe/webhook",status="200"'
    assert f"tollhouse_http_requests_total{{{label}}} 1.0" in metrics
    assert 'tollhouse_stripe_events_total{status="ignored"} 1.0' in metrics
    assert "post" in spec["paths"]["/v1/stripe/webhook"]  # still published


async def test_metrics_count_webhook_batches_and_the_deliveries_in_them(
    client: httpx.AsyncClient,
) -> None:
    bodies = [json.dumps(fs.event("foo.bar", {"id": f"b{n}"})) for n in range(12)]
    answers = await asyncio.gather(
        *(client.post("/v1/stripe/webhook", content=b, headers=fs.sign(b)) for b in bodies)
    )
    assert all(answer.status_code == 200 for answer in answers)
    text = (await client.get("/metrics")).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("tollhouse_stripe_webhook_")
    }
    assert values["tollhouse_stripe_webhook_batched_total"] == 12
    assert 1 <= values["tollhouse_stripe_webhook_batches_total"] < 12  # some went together


async def test_mounted_under_a_root_path_routing_decides(
    apps: tuple[FastAPI, FastAPI],
) -> None:
    """Under a root path the route's path differs from the raw one: the short path stands
    aside, and both answer what routing answers (nothing is stored)."""
    body, headers = signed(fs.event("foo.bar", {"id": "m"}, event_id="evt_mounted"))
    answers = [await exchange(app, body, headers, root_path="/v1") for app in apps]
    assert answers[0] == answers[1]
    assert answers[0][0] == 404
