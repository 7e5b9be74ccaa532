"""Property tests through the real proxy: whatever path, query and headers a caller sends,
nothing reaches Pleo with another company's id, a path outside the catalog, or a second
Authorization header."""

from __future__ import annotations

import base64
import secrets
import socket
import uuid
from pathlib import Path
from urllib.parse import unquote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.servers import broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

from broker.catalog import load_catalog

CATALOG = load_catalog()
COMPANY = str(uuid.uuid4())
OTHER = str(uuid.uuid4())
KEY = "pik_" + secrets.token_hex(20)
ALL_SCOPES = sorted({r.scope for r in CATALOG.routes if r.scope})

segment_text = st.sampled_from(
    [
        "abc",
        "123",
        COMPANY,
        OTHER,
        COMPANY.upper(),
        "..",
        ".",
        "",
        "%2e%2e",
        "%2F",
        "a%2fb",
        "x:archive",
        ":search",
        "%00",
        "%41",
        "~",
        "a;b",
        "a@b",
        "%zz",
        "\\",
        "é",
    ]
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    route = draw(st.sampled_from(CATALOG.routes))
    parts = []
    for part in route.template.split("/")[1:]:
        if "{" in part:
            head, _, rest = part.partition("{")
            _, _, tail = rest.partition("}")
            value = draw(st.one_of(segment_text, st.sampled_from(["abc", "123", COMPANY])))
            part = head + value + tail
        elif draw(st.integers(0, 9)) == 0:
            part = draw(segment_text)
        parts.append(part)
    if draw(st.integers(0, 4)) == 0:
        parts.extend(draw(st.lists(segment_text, max_size=2)))
    prefix = draw(st.sampled_from(["/"] * 8 + ["//", "http://pleo.evil/", ""]))
    return prefix + "/".join(parts)


company_values = st.sampled_from(
    [COMPANY, COMPANY, COMPANY, OTHER, COMPANY.upper(), "", "x", OTHER.replace("-", "")]
)
query_names = st.sampled_from(
    [
        "company_id",
        "companyId",
        "COMPANY_ID",
        "company-id",
        "organization_id",
        "organisationId",
        "limit",
        "job_id",
        "company_id[]",
        "company%5Fid",
    ]
)


@st.composite
def queries(draw: st.DrawFn) -> str:
    pairs = draw(st.lists(st.tuples(query_names, company_values), max_size=3))
    separator = draw(st.sampled_from(["&", ";"]))
    return separator.join(f"{name}={value}" for name, value in pairs)


header_sets = st.lists(
    st.sampled_from(
        [
            ("Authorization", "Basic " + base64.b64encode(b"stolen:").decode()),
            ("authorization", "Bearer token"),
            ("AUTHORIZATION", "Basic Zm9vOg=="),
            ("Proxy-Authorization", "Basic eDp5"),
            ("X-Broker-Tenant", "acme"),
            ("x-broker-tenant", "other"),
            ("X_Broker_Tenant", "acme"),
            ("Connection", "authorization"),
            ("Cookie", "a=b"),
            ("X-Extra", "1"),
            ("X-Extra", "2"),
            ("Accept", "application/json"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Forwarded-Host", "pleo.evil"),
            ("Forwarded", "host=pleo.evil"),
            ("X-Original-URL", "/v1/installations/me"),
            ("Content-Type", "text/plain, application/json"),
            ("Content-Type", "text/plain"),
            ("Origin", "https://pleo.evil"),
        ]
    ),
    max_size=3,
)


def send_raw(
    url: str, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_nothing_unsafe_reaches_upstream(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    upstream.add_key(KEY, COMPANY, ALL_SCOPES)
    url, upstream_thread = start_app(upstream)
    broker = start_broker(broker_settings(url, tmp_path / "store"))
    try:
        response = httpx.put(
            f"{broker.admin_url}/v1/tenants/acme/key", headers=broker.auth, json={"api_key": KEY}
        )
        assert response.status_code == 200
        expected_auth = b"Basic " + base64.b64encode(KEY.encode() + b":")
        forwarded: list[int] = []

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
            path=paths(),
            query=queries(),
            headers=header_sets,
            body_company=st.sampled_from([None, COMPANY, OTHER, 7]),
        )
        def check(
            method: str,
            path: str,
            query: str,
            headers: list[tuple[str, str]],
            body_company: object,
        ) -> None:
            upstream.seen.clear()
            target = path + ("?" + query if query else "")
            body = b""
            if method in ("POST", "PUT") and body_company is not None:
                body = (
                    '{"companyId": %s}'
                    % (f'"{body_company}"' if isinstance(body_company, str) else body_company)
                ).encode()
            send_raw(
                broker.proxy_url, method, target, [("X-Broker-Tenant", "acme"), *headers], body
            )
            forwarded.extend(1 for _ in upstream.seen)
            for seen in upstream.seen:
                names = [name for name, _ in seen.headers]
                assert names.count(b"authorization") == 1
                assert seen.values(b"authorization") == [expected_auth]
                assert b"x-broker-tenant" not in names
                assert b"x_broker_tenant" not in names
                assert b"proxy-authorization" not in names
                assert not {b"x-http-method-override", b"x-forwarded-host", b"forwarded"} & set(
                    names
                )
                assert b"x-original-url" not in names and b"origin" not in names
                assert len(seen.values(b"content-type")) <= 1
                assert b"," not in b"".join(seen.values(b"content-type"))
                decoded = unquote(seen.raw_path.decode("ascii"))
                found = CATALOG.match(seen.method, decoded)
                assert found is not None, seen.raw_path
                if found.route.path_company is not None:  # other ids may be any value
                    assert found.params[found.route.path_company].lower() == COMPANY
                for pair in seen.query.decode().replace(";", "&").split("&"):
                    name, _, value = pair.partition("=")
                    normal = unquote(name).lower().replace("_", "").replace("-", "")
                    if "company" in normal or "organi" in normal:
                        assert unquote(value).lower() == COMPANY, seen.query
                if b'"companyId"' in seen.body:
                    assert COMPANY.encode() in seen.body and OTHER.encode() not in seen.body

        check()
        assert len(forwarded) >= 25, "too few generated requests were forwarded to mean much"
    finally:
        broker.thread.stop()
        upstream_thread.stop()
