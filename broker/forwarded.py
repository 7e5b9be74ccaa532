"""`X-Forwarded-Proto` and `X-Forwarded-For` on the admin and connect listeners, from a proxy
on this machine only.

A TLS-terminating proxy in the same pod (a sidecar on loopback) tells the listener the scheme
and the address the request came with; from anyone else these headers are only claims, and are
ignored. This is what uvicorn's default did for these listeners (it trusted 127.0.0.1); the
proxy listener reads neither the client nor the scheme and skips this (docs/decisions.md).
"""

from __future__ import annotations

import ipaddress
from typing import Any

SCHEMES = frozenset({"http", "https"})


def forwarded(scope: dict[str, Any]) -> None:
    """Take the scheme and client from a loopback peer's forwarding headers, in place."""
    client = scope.get("client")
    if not client or not _loopback(client[0]):
        return
    proto: bytes | None = None
    hops: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-for":
            hops.append(value)
    if proto is not None:
        scheme = proto.decode("latin-1").strip().lower()
        if scheme in SCHEMES:
            scope["scheme"] = scheme
    if hops:
        host = _client_host(b",".join(hops).decode("latin-1"))
        if host:
            scope["client"] = (host, 0)


def _client_host(header: str) -> str | None:
    """The nearest address in an `X-Forwarded-For` list that is not this machine's own proxy
    chain: the last hop a loopback proxy did not add (or the first, if all are loopback)."""
    hops = [hop.strip() for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _loopback(hop):
            return hop
    return hops[0] if hops else None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
