"""A small fake Stripe API on 127.0.0.1, built from the real object shapes of Stripe's
OpenAPI fixtures (`fixtures3.json`), and builders of signed webhook events.

It keeps objects by kind, answers list calls with cursor pages, creates customers,
Checkout and portal sessions, and honours `Idempotency-Key` the way Stripe does: the same
key replays the first answer, the same key with other parameters is an error.
"""

from __future__ import annotations

import copy
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import stripe

#: The kinds we use, copied from Stripe's OpenAPI fixtures (fixtures3.json, MIT licence).
FIXTURES = Path(__file__).with_name("stripe_shapes.json")
SECRET = "whsec_test_secret_one"
OTHER_SECRET = "whsec_test_secret_two"

Obj = dict[str, Any]

_KINDS = {
    "customers": "customer",
    "products": "product",
    "prices": "price",
    "subscriptions": "subscription",
    "invoices": "invoice",
    "events": "event",
}


def _load_fixtures() -> dict[str, Obj]:
    resources: dict[str, Obj] = json.loads(FIXTURES.read_text())["resources"]
    return resources


_FIXTURES = _load_fixtures()


def shape(kind: str, **fields: Any) -> Obj:
    """A Stripe object of `kind` in the fixtures' real shape, with `fields` set."""
    base = copy.deepcopy(_FIXTURES.get(kind, {"object": kind}))
    base.update(fields)
    return base


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def price(price_id: str, *, recurring: bool = True, **meta: str) -> Obj:
    return shape(
        "price",
        id=price_id,
        metadata=dict(meta),
        type="recurring" if recurring else "one_time",
        recurring={"interval": "month", "interval_count": 1, "usage_type": "licensed"}
        if recurring
        else None,
        unit_amount=2000,
        product="prod_tollhouse",
    )


def subscription(
    sub_id: str,
    customer: str,
    the_price: Obj,
    *,
    status: str = "active",
    start: int,
    end: int,
    new_api: bool = True,
    cancel_at_period_end: bool = False,
) -> Obj:
    """A subscription; with `new_api` the period is on the item only (API 2025-03-31+)."""
    item = copy.deepcopy(shape("subscription").get("items", {}).get("data", [{}])[0])
    item.update(id=f"si_{sub_id}", price=the_price, subscription=sub_id, quantity=1)
    item.update(current_period_start=start, current_period_end=end)
    obj = shape(
        "subscription",
        id=sub_id,
        customer=customer,
        status=status,
        cancel_at_period_end=cancel_at_period_end,
        canceled_at=None,
        ended_at=None,
        cancel_at=None,
        trial_end=None,
        metadata={},
        items={"object": "list", "data": [item], "has_more": False, "url": "/v1/x"},
    )
    obj.pop("current_period_start", None)
    obj.pop("current_period_end", None)
    if not new_api:
        obj.update(current_period_start=start, current_period_end=end)
    return obj


def invoice(
    invoice_id: str, customer: str, sub_id: str, the_price: Obj, *, start: int, end: int
) -> Obj:
    line = copy.deepcopy(shape("invoice")["lines"]["data"][0])
    line.update(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        period={"start": start, "end": end},
        price=the_price,
        subscription=sub_id,
        parent={
            "type": "subscription_item_details",
            "subscription_item_details": {"subscription": sub_id, "proration": False},
        },
    )
    return shape(
        "invoice",
        id=invoice_id,
        customer=customer,
        status="paid",
        amount_due=2000,
        amount_paid=2000,
        period_start=start - 30 * 86400,
        period_end=start,
        parent={"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
        lines={"object": "list", "data": [line], "has_more": False, "url": "/v1/x"},
    )


def event(type_: str, obj: Obj, *, created: int | None = None, event_id: str | None = None) -> Obj:
    return shape(
        "event",
        id=event_id or new_id("evt"),
        type=type_,
        created=created if created is not None else int(time.time()),
        data={"object": obj},
        api_version="2025-03-31.basil",
    )


def sign(body: str, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    """Headers of a delivery signed as Stripe signs it."""
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


@dataclass
class FakeStripe:
    """The fake's state; tests read and change it directly."""

    objects: dict[str, dict[str, Obj]] = field(
        default_factory=lambda: {kind: {} for kind in _KINDS}
    )
    idempotency: dict[str, tuple[str, int, Obj]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any], str | None]] = field(default_factory=list)
    line_items: dict[str, list[Obj]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def put(self, kind: str, obj: Obj) -> None:
        with self.lock:
            self.objects[kind][obj["id"]] = copy.deepcopy(obj)

    def created(self, kind: str) -> int:
        return sum(1 for method, path, _, _ in self.requests if method == "POST" and kind in path)

    def handle(
        self, method: str, path: str, params: dict[str, Any], key: str | None
    ) -> tuple[int, Obj]:
        with self.lock:
            self.requests.append((method, path, params, key))
            if key is not None and method == "POST":
                fingerprint = json.dumps([path, params], sort_keys=True)
                if key in self.idempotency:
                    first, status, body = self.idempotency[key]
                    if first != fingerprint:
                        return 400, _error(
                            "idempotency_error",
                            "Keys for idempotent requests"
                            " can only be used with the same parameters",
                            kind="idempotency_error",
                        )
                    return status, body
                status, body = self._route(method, path, params)
                self.idempotency[key] = (fingerprint, status, body)
                return status, body
            return self._route(method, path, params)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, Obj]:
        parts = [p for p in path.split("/") if p][1:]  # drop "v1"
        if method == "POST" and parts == ["customers"]:
            obj = shape("customer", id=new_id("cus"), metadata=params.get("metadata", {}))
            self.objects["customers"][obj["id"]] = obj
            return 200, obj
        if method == "POST" and parts == ["checkout", "sessions"]:
            session_id = new_id("cs_test")
            return 200, shape(
                "checkout.session",
                id=session_id,
                url=f"https://checkout.stripe.test/c/pay/{session_id}",
                mode=params.get("mode"),
                customer=params.get("customer"),
                client_reference_id=params.get("client_reference_id"),
                metadata=params.get("metadata", {}),
            )
        if method == "POST" and parts == ["billing_portal", "sessions"]:
            return 200, shape(
                "billing_portal.session",
                id=new_id("bps"),
                url="https://billing.stripe.test/p/session/x",
                customer=params.get("customer"),
            )
        if method == "GET" and len(parts) == 4 and parts[:2] == ["checkout", "sessions"]:
            return 200, _page(self.line_items.get(parts[2], []), {}, "/v1/x")
        if method == "GET" and len(parts) == 1 and parts[0] in _KINDS:
            items = sorted(self.objects[parts[0]].values(), key=lambda o: o["id"])
            # As Stripe lists: subscriptions without canceled ones unless `status=all`, and
            # `created[gte]` when given.
            if parts[0] == "subscriptions" and params.get("status") != "all":
                items = [o for o in items if o.get("status") != "canceled"]
            since = (params.get("created") or {}).get("gte")
            if since is not None:
                items = [o for o in items if int(o.get("created") or 0) >= int(since)]
            return 200, _page(items, params, f"/v1/{parts[0]}")
        if method == "GET" and len(parts) == 2 and parts[0] in _KINDS:
            found = self.objects[parts[0]].get(parts[1])
            if found is None:
                return 404, _error("resource_missing", f"No such {_KINDS[parts[0]]}")
            return 200, found
        return 404, _error("resource_missing", f"Unrecognized request URL ({method} {path})")


def _error(code: str, message: str, kind: str = "invalid_request_error") -> Obj:
    return {"error": {"type": kind, "code": code, "message": message}}


def _page(items: list[Obj], params: dict[str, Any], url: str) -> Obj:
    after = params.get("starting_after")
    if after:
        ids = [o["id"] for o in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = int(params.get("limit", 10))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}


def _form(text: str) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    out: dict[str, Any] = {}
    for key, values in parse_qs(text, keep_blank_values=True).items():
        path = key.replace("]", "").split("[")
        node: Any = out
        for i, part in enumerate(path):
            last = i == len(path) - 1
            nxt: Any = values[0] if last else ([] if path[i + 1].isdigit() else {})
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                if node[index] is None:
                    node[index] = nxt
                node = node[index]
            else:
                node = node.setdefault(part, nxt)
    return out


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStripe

    def _answer(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        params = _form(body if method == "POST" else split.query)
        status, obj = self.fake.handle(
            method, split.path, params, self.headers.get("Idempotency-Key")
        )
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve() -> Iterator[FakeStripe]:
    """Run a fake Stripe on 127.0.0.1; its `url` is the API base."""
    fake = FakeStripe()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
