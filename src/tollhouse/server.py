"""`tollhouse serve`: bind, start the database, check it, migrate, open the pool, serve.

The order matters: the port is bound first (a port in use fails at once), the embedded
server starts next, and on SIGINT/SIGTERM everything stops in reverse order, the embedded
PostgreSQL last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Generator
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tollhouse.api import create_app
from tollhouse.app import (
    Tollhouse,
    billing_config,
    database_url,
    identity_config,
    runtime_url,
)
from tollhouse.db import migrate
from tollhouse.db.pool import check_server
from tollhouse.errors import MigrationsPending, PortInUse
from tollhouse.settings import Settings

log = structlog.get_logger("tollhouse.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or `PortInUse` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Answers go out in more than one write; without NODELAY, Nagle's algorithm holds the
    # last one back until the client's delayed ACK (about 40 ms a request). Accepted
    # connections inherit the option.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(
            f"cannot listen on {host}:{port}: {exc.strerror}", host=host, port=port
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class CoalescedWrites(asyncio.Transport):
    """A connection's transport whose writes in one turn of the event loop leave as one.

    uvicorn writes an answer's head and its body separately, and each write is a system call
    (a packet, with TCP_NODELAY) that costs about as much CPU as our middleware: together
    they were a sixth of the service's CPU per webhook delivery. The writes wait for the end
    of the loop's turn (`call_soon`), never longer, and `close` sends what waits first."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing each answer in one system call."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport, self.loop))


class _Server(uvicorn.Server):
    """uvicorn, minus its habit of re-raising the stop signal after shutdown: we still
    have the pool and the embedded PostgreSQL to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)  # shutdown goes on; a second signal waits


class _StopRequests:
    """Remembers SIGINT/SIGTERM during start-up, so the embedded PostgreSQL is never left
    half-started: start-up finishes its step, then everything stops in order."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def run(settings: Settings, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM; raise a `TollhouseError` when start-up fails."""
    stop = _StopRequests()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    sock = bind_socket(settings.host, settings.port)
    try:
        with database_url(settings) as dsn:
            if not stop.requested:
                _run_loop(_serve(settings, dsn, sock, announce, stop))
            # From here on a second signal must not cut the shutdown short.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
    finally:
        sock.close()
    log.info("stopped")


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the service on uvloop where it is installed (a dependency, except on Windows),
    as uvicorn itself would: less CPU a request than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    uvloop.run(main)


async def _serve(
    settings: Settings,
    dsn: str,
    sock: socket.socket,
    announce: Callable[[str], None],
    stop: _StopRequests,
) -> None:
    info = await check_server(dsn)
    log.info("database", version=info.version, embedded=settings.embedded)
    if settings.migrate_on_start:
        for applied in await migrate.migrate(dsn):
            log.info("migration_applied", file=applied.filename)
    statuses = await migrate.verify(dsn)
    pending = [s.filename for s in statuses if s.state == "pending"]
    if len(pending) == len(statuses):
        raise MigrationsPending("the database has no Tollhouse schema yet: run 'tollhouse migrate'")
    if pending:
        log.warning(
            "migrations_pending",
            pending=pending,
            message="/readyz answers 503 until 'tollhouse migrate' applies them",
        )
    if stop.requested:
        return
    async with Tollhouse.open(
        runtime_url(settings, dsn),
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        identity=identity_config(settings),
        credit_lanes=settings.credit_lanes,
        billing=billing_config(settings),
    ) as tollhouse:
        if settings.bootstrap_api_key and not pending:
            created = await tollhouse.keys.create_bootstrap()
            if created is not None:
                announce(
                    "Created the first service API key (shown once; store it now):\n"
                    f"  {created.secret}\n"
                    "Send it as 'Authorization: Bearer <key>'. More: 'tollhouse keys --help'."
                )
        config = uvicorn.Config(
            create_app(tollhouse),
            http=HttpProtocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=10,
        )
        server = _Server(config)
        server.should_exit = stop.requested
        # What start-up made (the app, its routes and models, the pools) lives as long as the
        # process: frozen, the collector stops scanning it again and again while requests
        # allocate. (Frozen objects are never collected: a pool connection replaced later
        # leaves its few start-up objects behind, a bounded cost.)
        gc.collect()
        gc.freeze()
        host, port = sock.getsockname()[:2]
        announce(f"Tollhouse is listening on http://{host}:{port} (API docs at /docs)")
        sys.stdout.flush()
        await server.serve(sockets=[sock])
