from __future__ import annotations

import pytest

from broker.headers import INVALID, JSON, OTHER, BodyKind, HostNames, body_kind

CONTENT_TYPES: list[tuple[bytes | None, BodyKind]] = [
    (None, JSON),  # undeclared: may be sniffed as JSON, so inspected
    (b"application/json", JSON),
    (b"Application/JSON; charset=utf-8", JSON),
    (b" application/json ", JSON),
    (b"text/json", JSON),
    (b"application/vnd.pleo.v3+json", JSON),
    (b"application/problem+json", JSON),
    (b"application/x-ndjson", JSON),
    (b"text/plain", OTHER),
    (b"application/octet-stream", OTHER),
    (b"multipart/form-data; boundary=abc", OTHER),
    (b'multipart/form-data; boundary="a,b"', OTHER),
    (b'text/plain; note="x, application/json"', OTHER),
    (b"text/plain; charset=json", OTHER),
    (b"text/plain, application/json", INVALID),
    (b"application/json, text/plain", INVALID),
    (b"application/json,", INVALID),
    (b"text/plain; charset=utf-8, application/json", INVALID),
    (b'text/plain; a="x", application/json', INVALID),
    (b"", INVALID),
    (b"json", INVALID),
    (b"application/", INVALID),
    (b"/json", INVALID),
    (b"application/js on", INVALID),
]


@pytest.mark.parametrize(("content_type", "kind"), CONTENT_TYPES)
def test_body_kind(content_type: bytes | None, kind: BodyKind) -> None:
    assert body_kind(content_type) is kind


DEFAULT = HostNames((), bind="127.0.0.1")
HOSTS: list[tuple[HostNames, bytes | None, bool]] = [
    (DEFAULT, b"127.0.0.1", True),
    (DEFAULT, b"127.0.0.1:8080", True),
    (DEFAULT, b"localhost", True),
    (DEFAULT, b"LocalHost:1", True),
    (DEFAULT, b"[::1]", True),
    (DEFAULT, b"[::1]:8080", True),
    (DEFAULT, None, False),
    (DEFAULT, b"", False),
    (DEFAULT, b":8080", False),
    (DEFAULT, b"127.0.0.1:", False),
    (DEFAULT, b"127.0.0.1:80x", False),
    (DEFAULT, b"127.0.0.1:80@evil.example", False),
    (DEFAULT, b"127.0.0.2", False),
    (DEFAULT, b"localhost.", False),
    (DEFAULT, b"evil.example", False),
    (DEFAULT, b"localhost.evil.example", False),
    (DEFAULT, b"127.0.0.1.nip.io", False),
    (DEFAULT, b"[::1", False),
    (DEFAULT, b"[::1]x", False),
    (DEFAULT, b"[::2]:80", False),
    (HostNames((), bind="0.0.0.0"), b"0.0.0.0:8080", True),
    (HostNames((), bind="::"), b"[::]:8080", True),
    (HostNames((), bind="broker.local"), b"broker.local", True),
    (HostNames(("broker.apps.svc",), bind="0.0.0.0"), b"broker.apps.svc:8080", True),
    (HostNames(("broker.apps.svc",), bind="0.0.0.0"), b"localhost", False),
    (HostNames(("*.example.com",), bind="0.0.0.0"), b"a.b.example.com", True),
    (HostNames(("*.example.com",), bind="0.0.0.0"), b"example.com", False),
    (HostNames(("*.example.com",), bind="0.0.0.0"), b"evilexample.com", False),
    (HostNames(("*",), bind="0.0.0.0"), b"anything", True),
]


@pytest.mark.parametrize(("names", "host", "allowed"), HOSTS)
def test_host_names(names: HostNames, host: bytes | None, allowed: bool) -> None:
    assert names.allows(host) is allowed
    assert names.allows(host) is allowed  # the second answer comes from the cache
