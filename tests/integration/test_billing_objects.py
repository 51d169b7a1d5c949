"""Reading Stripe objects in SQL (migration 0009): periods that moved between API versions,
an invoice's subscription and line, and the `tollhouse_*` metadata of a price."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support import fake_stripe as fs


def _call(conn: psycopg.Connection[Any], sql: str, *params: Any) -> tuple[Any, ...]:
    row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
    assert row is not None
    return row


def _tenant(conn: psycopg.Connection[Any], customer: str) -> uuid.UUID:
    tenant = uuid.uuid4()
    conn.execute(
        "INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)"
        " VALUES (%s, 't', gen_random_uuid(), true)",
        (tenant,),
    )
    conn.execute("SELECT tollhouse.billing_link_v1(%s, %s)", (customer, tenant))
    return tenant


def test_the_period_is_read_from_the_subscription_or_from_its_items(dsn: str) -> None:
    the_price = fs.price("price_x", tollhouse_plan="pro")
    new = fs.subscription("sub_new", "cus_1", the_price, start=100, end=200)
    old = fs.subscription("sub_old", "cus_1", the_price, start=100, end=200, new_api=False)
    old["items"]["data"][0].pop("current_period_start")
    old["items"]["data"][0].pop("current_period_end")
    with psycopg.connect(dsn) as conn:
        _tenant(conn, "cus_1")
        for sub in (new, old):
            status, *_ = _call(
                conn,
                "SELECT status FROM tollhouse.billing_apply_v1(%s, %s, now())",
                "customer.subscription.created",
                Jsonb(sub),
            )
            assert status == "processed"
            period = _call(
                conn,
                "SELECT extract(epoch FROM current_period_start)::int,"
                " extract(epoch FROM current_period_end)::int, plan"
                " FROM tollhouse.subscriptions WHERE id = %s",
                sub["id"],
            )
            assert period == (100, 200, "pro")


def test_an_invoice_names_its_subscription_and_period_in_either_shape(dsn: str) -> None:
    the_price = fs.price("price_x", tollhouse_plan="pro")
    inv = fs.invoice("in_1", "cus_1", "sub_1", the_price, start=1000, end=2000)
    older = {**inv, "id": "in_2", "parent": None, "subscription": "sub_2"}
    newer_line = {
        **inv["lines"]["data"][0],
        "price": None,
        "pricing": {"price_details": {"price": "price_y"}},
    }
    newest = {**inv, "id": "in_3", "lines": {"data": [newer_line]}}
    with psycopg.connect(dsn) as conn:
        _tenant(conn, "cus_1")
        conn.execute(
            "INSERT INTO tollhouse.billing_prices (id, plan, type, stripe_at)"
            " VALUES ('price_y', 'starter', 'recurring', now())"
        )
        for invoice in (inv, older, newest):
            conn.execute(
                "SELECT tollhouse.billing_apply_v1('invoice.updated', %s, now())", (Jsonb(invoice),)
            )
        found = conn.execute(
            "SELECT id, subscription_id, plan, extract(epoch FROM period_start)::int,"
            " extract(epoch FROM period_end)::int FROM tollhouse.invoices ORDER BY id"
        ).fetchall()
    assert found == [
        ("in_1", "sub_1", "pro", 1000, 2000),  # under parent (2025-03-31+), the line's period
        ("in_2", "sub_2", "pro", 1000, 2000),
        ("in_3", "sub_1", "starter", 1000, 2000),  # a price id under `pricing`
    ]


def test_price_metadata_terms(dsn: str) -> None:
    def terms(price: dict[str, Any]) -> tuple[Any, ...]:
        return _call(
            conn,
            "SELECT plan, credits, lifetime FROM tollhouse.billing_price_terms_v1(%s)",
            Jsonb(price),
        )

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert terms(fs.price("p", tollhouse_plan="pro")) == ("pro", None, False)
        assert terms(fs.price("p", recurring=False, tollhouse_credits="500")) == (None, 500, False)
        assert terms(fs.price("p", tollhouse_plan="power", tollhouse_lifetime="TRUE"))[2]
        assert terms(fs.price("p")) == (None, None, False)
        for bad in ("0", "1e3", "-5", "99999999999999999999"):
            with pytest.raises(psycopg.Error, match="positive integer") as raised:
                terms(fs.price("p", tollhouse_credits=bad))
            assert raised.value.sqlstate == "TB001"
        with pytest.raises(psycopg.Error, match="needs tollhouse_plan"):
            terms(fs.price("p", tollhouse_lifetime="true"))
