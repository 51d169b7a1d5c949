"""The service's HTTP protocol: uvicorn's, with each answer leaving in one write."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from tollhouse.api.middleware import _new_request_id
from tollhouse.server import HttpProtocol


class Recorder(asyncio.Transport):
    """What the protocol did to its connection, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def exchange(request: bytes) -> list[tuple[str, bytes]]:
    config = uvicorn.Config(app, http=HttpProtocol, lifespan="off", log_config=None)
    config.load()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    connection = Recorder()
    protocol.connection_made(connection)
    protocol.data_received(request)
    for _ in range(20):
        await asyncio.sleep(0)
    return connection.calls


async def test_an_answer_leaves_in_one_write() -> None:
    calls = await exchange(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert len(calls) == 1
    kind, data = calls[0]
    assert kind == "write"
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok")


async def test_what_waits_is_written_before_the_connection_closes() -> None:
    calls = await exchange(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert [kind for kind, _ in calls] == ["write", "close"]
    assert calls[0][1].endswith(b"ok")


def test_made_request_ids_are_32_hex_digits_and_never_repeat() -> None:
    made = {_new_request_id() for _ in range(1000)}
    assert len(made) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)
