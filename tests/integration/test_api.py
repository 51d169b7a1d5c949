"""The HTTP surface of the foundation, in-process: health, errors, auth, keys, metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from structlog.testing import capture_logs

from tollhouse.api import create_app
from tollhouse.app import Tollhouse
from tollhouse.db import migrate


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": True, "migrations": True}


async def test_readyz_is_503_while_migrations_are_pending(empty_dsn: str) -> None:
    # The code is newer than the database: the last migration is not applied yet.
    await migrate.migrate(empty_dsn, migrate.load_migrations()[:-1])
    async with Tollhouse.open(empty_dsn, min_size=1, max_size=1) as tollhouse:
        transport = httpx.ASGITransport(app=create_app(tollhouse))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.get("/readyz")
    assert answer.status_code == 503
    body = answer.json()["error"]
    assert body["code"] == "not_ready"
    assert body["database"] is True and body["migrations"] is False
    assert "tollhouse migrate" in body["message"]


async def test_openapi_publishes_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    app_routes = {
        (route.path, method.lower())
        for route in client._transport.app.routes  # type: ignore[attr-defined]
        if getattr(route, "include_in_schema", False)
        for method in getattr(route, "methods", ())
    }
    published = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert app_routes <= published
    assert {"/healthz", "/readyz", "/metrics", "/v1/keys", "/v1/keys/{key_id}"} <= set(
        spec["paths"]
    )
    assert (await client.get("/docs")).status_code == 200


async def test_service_key_is_required(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    missing = await client.get("/v1/keys")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthenticated"
    wrong = await client.get("/v1/keys", headers={"Authorization": "Bearer th_nope_nope"})
    assert wrong.status_code == 401
    ok = await client.get("/v1/keys", headers=auth)
    assert ok.status_code == 200
    assert [k["name"] for k in ok.json()["keys"]] == ["tests"]


async def test_create_list_and_revoke_keys_over_http(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    created = await client.post("/v1/keys", json={"name": "deploy"}, headers=auth)
    assert created.status_code == 201
    secret = created.json()["secret"]
    key_id = created.json()["key"]["id"]
    assert "secret" not in str((await client.get("/v1/keys", headers=auth)).json())
    new_auth = {"Authorization": f"Bearer {secret}"}
    assert (await client.get("/v1/keys", headers=new_auth)).status_code == 200
    revoked = await client.delete(f"/v1/keys/{key_id}", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert (await client.get("/v1/keys", headers=new_auth)).status_code == 401
    again = await client.delete("/v1/keys/00000000-0000-7000-8000-000000000000", headers=auth)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "api_key_not_found"


async def test_duplicate_name_is_409_with_its_code(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await client.post("/v1/keys", json={"name": "deploy"}, headers=auth)
    again = await client.post("/v1/keys", json={"name": "deploy"}, headers=auth)
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "api_key_name_taken"
    assert "sqlstate" not in error and "constraint" not in error


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"name": ', "application/json", 400, "invalid_json"),
        (b"name=deploy", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"name": "deploy"}', "text/plain", 415, "unsupported_media_type"),
        (b"{}", "application/json", 422, "validation_error"),
        (b'{"name": "x", "extra": 1}', "application/json", 422, "validation_error"),
        (b'{"name": "has\\nnewline"}', "application/json", 422, "validation_error"),
        (b'{"name": "' + b"a" * 101 + b'"}', "application/json", 422, "validation_error"),
        (b"[1, 2]", "application/json", 422, "validation_error"),
    ],
)
async def test_bad_bodies_get_the_envelope_and_write_nothing(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    answer = await client.post(
        "/v1/keys", content=content, headers={**auth, "Content-Type": content_type}
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert [k.name for k in await tollhouse.keys.list()] == ["tests"]


async def test_a_body_over_a_mebibyte_is_413_before_it_is_parsed(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Declared (refused before reading) or streamed without a length (cut off once past)."""
    padding = " " * (1 << 20)
    body = ('{"email": "big@example.com", "display_name": "x"' + padding + "}").encode()
    headers = {**auth, "Content-Type": "application/json"}
    declared = await client.post("/v1/users", content=body, headers=headers)
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    streamed = await client.post("/v1/users", content=chunks(), headers=headers)
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "payload_too_large")
    assert await tollhouse.users.find_by_email("big@example.com") is None
    small = await client.post(
        "/v1/users", content=body.replace(padding.encode(), b""), headers=headers
    )
    assert small.status_code == 201, small.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_answer_head_too(client: httpx.AsyncClient, path: str) -> None:
    answer = await client.head(path)
    assert answer.status_code == 200 and answer.content == b""


async def test_validation_errors_name_the_field(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    answer = await client.post("/v1/keys", json={}, headers=auth)
    error = answer.json()["error"]
    assert error["message"].startswith("name:")
    assert error["errors"][0]["loc"] == ["body", "name"]


async def test_unknown_paths_and_methods_get_the_envelope(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = await client.put("/healthz")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_request_ids_are_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "req-123"})
    assert given.headers["x-request-id"] == "req-123"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])


async def test_an_unhandled_error_is_a_500_envelope_without_traceback(
    tollhouse: Tollhouse,
) -> None:
    app: FastAPI = create_app(tollhouse)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at line 42")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.get("/boom")
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == answer.headers["x-request-id"]
    assert "secret internals" not in answer.text and "Traceback" not in answer.text


async def test_metrics_count_requests_by_route_and_show_the_pool(
    client: httpx.AsyncClient,
) -> None:
    await client.get("/healthz")
    await client.get("/v1/keys")  # 401
    text = (await client.get("/metrics")).text
    assert 'tollhouse_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'tollhouse_http_requests_total{method="GET",route="/v1/keys",status="401"} 1.0' in text
    assert "tollhouse_http_request_duration_seconds_bucket" in text
    assert re.search(r"^tollhouse_db_pool_size \d", text, re.MULTILINE)
    for lanes in ("tollhouse-credit-lanes", "tollhouse-webhook-lanes"):
        assert re.search(rf'^tollhouse_db_lanes_pool_max{{pool="{lanes}"}} \d', text, re.MULTILINE)


async def test_a_server_side_domain_error_is_logged_with_its_details(
    tollhouse: Tollhouse,
) -> None:
    app: FastAPI = create_app(tollhouse)

    @app.get("/broken-sql")
    async def broken_sql() -> None:
        async with tollhouse.db.connection() as conn:
            await conn.execute("SELECT * FROM tollhouse.missing_table")

    transport = httpx.ASGITransport(app=app)
    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.get("/broken-sql")
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["code"] == "database_error"
    assert "missing_table" not in answer.text  # details stay out of the answer...
    assert error["request_id"] == answer.headers["x-request-id"]
    (failure,) = [entry for entry in logs if entry["event"] == "request_failed"]
    assert failure["sqlstate"] == "42P01"  # ...and go to the log
    assert "missing_table" in failure["error"]
