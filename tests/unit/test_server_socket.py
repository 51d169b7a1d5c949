import socket

import pytest

from tollhouse.errors import PortInUse
from tollhouse.server import bind_socket


def test_the_listening_socket_disables_nagle() -> None:
    """Accepted connections inherit TCP_NODELAY; without it each answer waited ~40 ms."""
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_a_port_in_use_is_named() -> None:
    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        first.close()
