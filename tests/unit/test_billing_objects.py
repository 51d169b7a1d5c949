"""Reading Stripe objects across API versions, price metadata, and the signature check."""

from __future__ import annotations

import json
import time

import pytest
import stripe

from tests.support import fake_stripe as fs
from tollhouse.billing import parse_event
from tollhouse.billing.objects import (
    Problem,
    invoice_period,
    invoice_subscription,
    line_price,
    price_terms,
    subscription_period,
)
from tollhouse.billing.signature import verify
from tollhouse.errors import InvalidWebhookPayload, InvalidWebhookSignature


def test_the_period_is_read_from_the_subscription_or_from_its_items() -> None:
    the_price = fs.price("price_x", tollhouse_plan="pro")
    new = fs.subscription("sub_1", "cus_1", the_price, start=100, end=200)
    old = fs.subscription("sub_1", "cus_1", the_price, start=100, end=200, new_api=False)
    old["items"]["data"][0].pop("current_period_start")
    old["items"]["data"][0].pop("current_period_end")
    for sub in (new, old):
        start, end = subscription_period(sub)
        assert start is not None and end is not None
        assert (int(start.timestamp()), int(end.timestamp())) == (100, 200)


def test_an_invoice_names_its_subscription_and_period_in_either_shape() -> None:
    the_price = fs.price("price_x", tollhouse_plan="pro")
    inv = fs.invoice("in_1", "cus_1", "sub_1", the_price, start=1000, end=2000)
    assert invoice_subscription(inv) == "sub_1"  # under parent (2025-03-31+)
    older = {**inv, "parent": None, "subscription": "sub_2"}
    assert invoice_subscription(older) == "sub_2"
    start, end = invoice_period(inv)
    assert start is not None and end is not None
    assert (int(start.timestamp()), int(end.timestamp())) == (1000, 2000)  # the line's period
    line = inv["lines"]["data"][0]
    assert line_price(line) == the_price
    newer_line = {**line, "price": None, "pricing": {"price_details": {"price": "price_y"}}}
    assert line_price(newer_line) == "price_y"


def test_price_metadata_terms() -> None:
    assert price_terms(fs.price("p", tollhouse_plan="pro")).plan == "pro"
    pack = price_terms(fs.price("p", recurring=False, tollhouse_credits="500"))
    assert (pack.credits, pack.lifetime, pack.sells_something) == (500, False, True)
    deal = price_terms(fs.price("p", tollhouse_plan="power", tollhouse_lifetime="TRUE"))
    assert deal.lifetime
    assert not price_terms(fs.price("p")).sells_something
    for bad in ("0", "1e3", "-5"):
        with pytest.raises(Problem):
            price_terms(fs.price("p", tollhouse_credits=bad))
    with pytest.raises(Problem, match="needs tollhouse_plan"):
        price_terms(fs.price("p", tollhouse_lifetime="true"))


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
