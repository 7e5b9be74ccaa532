"""`X-Forwarded-Proto` and `-For` count only from a proxy on loopback (broker.forwarded)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.forwarded import forwarded


def scope(client: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"client": (client, 40000), "scheme": "http", "headers": list(headers)}


PROTO = (b"x-forwarded-proto", b"https")


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.53", "::1"])
def test_a_loopback_peer_is_believed(client: str) -> None:
    given = scope(client, PROTO, (b"x-forwarded-for", b"198.51.100.7"))
    forwarded(given)
    assert given["scheme"] == "https" and given["client"] == ("198.51.100.7", 0)


@pytest.mark.parametrize("client", ["10.0.0.5", "203.0.113.9", "::ffff:10.0.0.5", "not-an-ip"])
def test_any_other_peer_is_not(client: str) -> None:
    given = scope(client, PROTO, (b"x-forwarded-for", b"198.51.100.7"))
    forwarded(given)
    assert given["scheme"] == "http" and given["client"] == (client, 40000)


def test_no_client_means_no_trust() -> None:
    given = {"client": None, "scheme": "http", "headers": [PROTO]}
    forwarded(given)
    assert given["scheme"] == "http"


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([b"198.51.100.7"], "198.51.100.7"),
        # the nearest address not added by the loopback proxy chain
        ([b"192.0.2.1, 198.51.100.7, 127.0.0.1"], "198.51.100.7"),
        # several headers are one list
        ([b"192.0.2.1", b"198.51.100.7"], "198.51.100.7"),
        # all loopback: the first
        ([b"127.0.0.2, 127.0.0.1"], "127.0.0.2"),
    ],
)
def test_the_client_is_the_nearest_hop_beyond_loopback(values: list[bytes], client: str) -> None:
    given = scope("127.0.0.1", *((b"x-forwarded-for", v) for v in values))
    forwarded(given)
    assert given["client"] == (client, 0)


@pytest.mark.parametrize("proto", [b"ftp", b"", b"https, http", b"javascript"])
def test_only_http_or_https_is_a_scheme(proto: bytes) -> None:
    given = scope("127.0.0.1", (b"x-forwarded-proto", proto))
    forwarded(given)
    assert given["scheme"] == "http"


def test_an_empty_forwarded_for_leaves_the_client() -> None:
    given = scope("127.0.0.1", (b"x-forwarded-for", b" , "))
    forwarded(given)
    assert given["client"] == ("127.0.0.1", 40000)
