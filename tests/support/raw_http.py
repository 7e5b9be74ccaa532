"""Talking HTTP/1.1 to a listener over a raw socket, for the tests that must see exactly what
goes over the wire: what is written, when, and when the connection closes."""

from __future__ import annotations

import re
import socket


def connect(port: int) -> socket.socket:
    """A connection to 127.0.0.1:`port` whose reads give up after 5 s."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """`data` and what arrives after it, up to and including `marker` (and what came with it)."""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}; got {data!r}")
        data += chunk
    return data


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, leaving the connection open."""
    data = read_until(sock, b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert match is not None, head
    while len(body) < int(match.group(1)):
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
