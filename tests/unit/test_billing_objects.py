"""The signature check and what a body must be to be an event. (Reading Stripe objects is
SQL: tests/integration/test_billing_objects.py.)"""

from __future__ import annotations

import json
import time

import pytest
import stripe

from tollhouse.billing import parse_event
from tollhouse.billing.signature import verify
from tollhouse.errors import InvalidWebhookPayload, InvalidWebhookSignature


def test_signature_rules() -> None:
    body = json.dumps({"id": "evt_1"}).encode()
    now = int(time.time())
    secrets = ("whsec_a", "whsec_b")
    for secret in secrets:
        header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, now)
        verify(body, header, secrets, now=now, tolerance=300)
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_a", now)
    for when in (now - 301, now + 301):
        with pytest.raises(InvalidWebhookSignature, match="300 s"):
            verify(body, header, secrets, now=when, tolerance=300)
    for broken in ("", "v1=abc", "t=1,t=2,v1=abc", f"t={now}", "t=-5,v1=00"):
        with pytest.raises(InvalidWebhookSignature):
            verify(body, broken, secrets, now=now, tolerance=300)
    with pytest.raises(InvalidWebhookSignature):
        verify(b"\xff\xfe", header, secrets, now=now, tolerance=300)  # not UTF-8


def test_parse_event_refuses_what_is_not_an_event() -> None:
    good = {"id": "evt_1", "type": "x.y", "created": 1, "data": {"object": {}}}
    assert parse_event(json.dumps(good).encode())["id"] == "evt_1"
    for bad in (b"", b"[1]", b'{"id": 1}', json.dumps({**good, "created": "1"}).encode()):
        with pytest.raises(InvalidWebhookPayload):
            parse_event(bad)
