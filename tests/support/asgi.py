"""Requests straight into an ASGI app, answered as raw parts, to compare two apps' answers
byte for byte (the short paths' tests)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

#: Status, raw headers, body.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


async def post(
    app: FastAPI, path: str, content: Any, headers: dict[str, str], root_path: str = ""
) -> Answer:
    """POST `content` to `path`; an error the app lets out is answered as a server would."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.post(path, content=content, headers=headers)
    return response.status_code, list(response.headers.raw), response.content


async def metrics_and_openapi(app: FastAPI) -> tuple[str, dict[str, Any]]:
    """The app's `/metrics` text and its OpenAPI document."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        metrics = (await http.get("/metrics")).text
        spec: dict[str, Any] = (await http.get("/openapi.json")).json()
    return metrics, spec
