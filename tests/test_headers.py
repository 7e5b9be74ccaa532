from __future__ import annotations

import os
import re

import pytest

from broker import errors
from broker.headers import (
    _ID_BATCH,
    INVALID,
    JSON,
    OTHER,
    BodyKind,
    HeaderRules,
    HostNames,
    body_kind,
    forwarded_request_headers,
    forwarded_response_headers,
    named_tenant,
    new_request_id,
)

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


TENANT_HEADER = b"x-broker-tenant"

REQUEST_FORWARDING: list[tuple[list[tuple[bytes, bytes]], dict[str, str]]] = [
    # the caller's headers, what goes to Pleo (besides X-Request-Id)
    ([(b"accept", b"application/json")], {"accept": "application/json"}),
    ([(b"accept", b"a/b"), (b"accept", b"c/d")], {"accept": "a/b, c/d"}),  # joined
    ([(b"authorization", b"Basic x"), (b"cookie", b"a=b")], {}),  # credentials
    ([(b"proxy-authorization", b"Bearer caller"), (b"proxy-authorization", b"x")], {}),  # caller
    ([(TENANT_HEADER, b"acme"), (b"host", b"localhost"), (b"x-request-id", b"r")], {}),
    ([(b"connection", b"keep-alive, x-secret"), (b"x-secret", b"1"), (b"te", b"trailers")], {}),
    ([(b"upgrade", b"h2c"), (b"transfer-encoding", b"chunked"), (b"expect", b"100-continue")], {}),
    ([(b"forwarded", b"for=1"), (b"x-forwarded-host", b"evil"), (b"x-envoy-original-path", b"/")],
     {}),
    ([(b"x-http-method-override", b"DELETE"), (b"x-original-url", b"/admin")], {}),
    ([(b"content-type", b"application/json"), (b"content-length", b"2")],
     {"content-type": "application/json", "content-length": "2"}),
    ([(b"x-custom", b"caf\xe9")], {"x-custom": "caf\xe9"}),  # latin-1 both ways
    # Connection cannot make what describes the body hop-by-hop (Pleo would see it undeclared)
    ([(b"connection", b"content-type, content-length"), (b"content-type", b"text/plain"),
      (b"content-length", b"2")], {"content-type": "text/plain", "content-length": "2"}),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "forwarded"), REQUEST_FORWARDING)
def test_forwarded_request_headers(
    headers: list[tuple[bytes, bytes]], forwarded: dict[str, str]
) -> None:
    out = forwarded_request_headers(headers, tenant_header=TENANT_HEADER, request_id=b"rid")
    assert out == {**forwarded, "X-Request-Id": "rid"}


RESPONSE_FORWARDING: list[tuple[list[tuple[bytes, bytes]], str | None, list[bytes]]] = [
    # Pleo's headers, its Connection header, the names relayed (besides x-request-id)
    ([(b"Content-Type", b"application/json"), (b"ETag", b"1")], None, [b"Content-Type", b"ETag"]),
    ([(b"Set-Cookie", b"a=b"), (b"X-Request-Id", b"theirs")], None, []),
    ([(b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"5"), (b"Connection", b"close")],
     "close", []),
    ([(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"X-Kept", b"2")], "X-Hop", [b"X-Kept"]),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "connection", "names"), RESPONSE_FORWARDING)
def test_forwarded_response_headers(
    headers: list[tuple[bytes, bytes]], connection: str | None, names: list[bytes]
) -> None:
    out = forwarded_response_headers(headers, connection=connection, request_id=b"rid")
    assert [name for name, _ in out] == [*names, b"x-request-id"]
    assert out[-1] == (b"x-request-id", b"rid")


RULES = HeaderRules("X-Broker-Tenant", DEFAULT)
BASE = [(b"host", b"127.0.0.1:8080"), (TENANT_HEADER, b"acme")]

CHECKS: list[tuple[list[tuple[bytes, bytes]], type[errors.BrokerError] | BodyKind | None]] = [
    # headers besides BASE, the refusal or (when admitted) the kind of body that follows
    ([], None),
    ([(b"content-length", b"0")], None),
    ([(b"content-length", b"2")], BodyKind.JSON),  # undeclared: inspected
    ([(b"transfer-encoding", b"chunked"), (b"content-type", b"text/plain")], BodyKind.OTHER),
    ([(b"content-length", b"2"), (b"content-type", b"application/json")], BodyKind.JSON),
    ([(b"content-type", b"text/plain, application/json")], errors.ContentTypeInvalid),
    ([(b"content-type", b"a/b"), (b"content-type", b"a/b")], errors.ContentTypeInvalid),
    ([(b"host", b"evil.example")], errors.HostNotAllowed),  # twice: names nothing
    ([(b"origin", b"https://evil.example")], errors.BrowserRequestRefused),
    ([(b"x-http-method-override", b"DELETE")], errors.RouteNotAllowed),
    ([(b"upgrade", b"h2c")], None),
    ([(b"upgrade", b"h2c"), (b"content-length", b"2")], errors.RouteNotAllowed),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "outcome"), CHECKS)
def test_header_rules_check(
    extra: list[tuple[bytes, bytes]], outcome: type[errors.BrokerError] | BodyKind | None
) -> None:
    head = RULES.read([*BASE, *extra])
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            RULES.check(head)
    else:
        assert RULES.check(head) is outcome


TENANTS: list[tuple[list[tuple[bytes, bytes]], str | type[errors.BrokerError]]] = [
    ([(TENANT_HEADER, b"acme")], "acme"),
    ([], errors.TenantMissing),
    ([(TENANT_HEADER, b"acme"), (TENANT_HEADER, b"acme")], errors.TenantInvalid),
    ([(b"x_broker_tenant", b"acme")], errors.TenantInvalid),
    ([(TENANT_HEADER, b"acme"), (b"x_broker_tenant", b"other")], errors.TenantInvalid),
    ([(TENANT_HEADER, b"../acme")], errors.TenantInvalid),
    ([(TENANT_HEADER, b"Acme")], errors.TenantInvalid),
]


@pytest.mark.parametrize(("headers", "outcome"), TENANTS)
def test_header_rules_tenant(
    headers: list[tuple[bytes, bytes]], outcome: str | type[errors.BrokerError]
) -> None:
    head = RULES.read(headers)
    if isinstance(outcome, str):
        assert RULES.tenant(head) == outcome == named_tenant(head)
    else:
        with pytest.raises(outcome):
            RULES.tenant(head)
        assert named_tenant(head) is None


@pytest.mark.parametrize(
    ("given", "kept"),
    [(b"req-1", True), (b"", False), (b"x" * 129, False), (b"caf\xe9", False)],
)
def test_request_id_is_the_callers_if_usable(given: bytes, kept: bool) -> None:
    head = RULES.read([(b"x-request-id", given)])
    if kept:
        assert head.request_id == given
    else:
        assert re.fullmatch(rb"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", head.request_id)


def test_request_ids_are_uuid4_and_distinct_across_batches() -> None:
    ids = [new_request_id() for _ in range(3 * _ID_BATCH + 7)]
    assert len(set(ids)) == len(ids)
    for request_id in ids:
        assert re.fullmatch(rb"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", request_id)


def test_a_forked_child_does_not_reuse_the_parents_request_ids() -> None:
    new_request_id()  # the parent holds a drawn batch
    parents: set[bytes] = set()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out
        os.close(read_end)
        os.write(write_end, b"".join(new_request_id() for _ in range(8)))
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parents.update(new_request_id() for _ in range(_ID_BATCH))
    childs = {data[i : i + 32] for i in range(0, len(data), 32)}
    assert len(childs) == 8
    assert not childs & parents
