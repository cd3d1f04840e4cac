"""Loopback serving helper."""

from __future__ import annotations

import socket

from kvgate.serving import bind_socket


def test_listening_socket_is_tcp_with_nodelay_and_loopback() -> None:
    # Regression: a proto-0 listening socket made asyncio skip TCP_NODELAY on accepted connections, and
    # Nagle + delayed ACK added ~40 ms to every controller /lookup answer (headers and body written apart).
    sock = bind_socket()
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
