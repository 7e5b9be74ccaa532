"""Request header rules of the proxy (docs/contract.md): pure values and functions, table-tested.

- `Host` must name the broker (`HostNames`, from `BROKER_PROXY_ALLOWED_HOSTS`; by default the
  loopback names and the bind address): a web page that rebinds its DNS name to 127.0.0.1 sends
  its own name, and is refused. A port is ignored; a missing or repeated `Host` names nothing.
- Headers only web browsers send (`BROWSER_ONLY`) earn a refusal: the proxy serves backends.
  `Sec-Fetch-Mode` is not one of them: Node's fetch (undici) sends it on every request, and a
  browser never sends it without `Sec-Fetch-Site`.
- Method overrides (`METHOD_OVERRIDE`) earn a refusal: the policy decides on the real method.
- A body with `Upgrade` earns a refusal: the server reads what follows the headers of an upgrade
  as the new protocol's (the body would be lost or misread). `Upgrade` without a body is dropped
  like every hop-by-hop header, except a WebSocket handshake (`Upgrade: websocket`), which is
  refused: the listeners speak no WebSocket, and Pleo's API has none.
- Headers that make a server, or a proxy in front of it, use another URL, host, scheme or client
  (`REROUTING`, `REROUTING_PREFIXES`) are dropped before Pleo.
- `Content-Type` (`body_kind`): one media type, given once. A subtype containing `json`
  (`application/json`, `text/json`, `application/…+json`, `application/x-ndjson`) or no
  `Content-Type` at all means the body is read and checked as JSON, because frameworks differ in
  what they parse as JSON and an undeclared body may be sniffed; any other media type streams
  untouched. A list (`text/plain, application/json`), an empty or a malformed media type is
  refused, since servers differ in which member of a list they believe.
- Forwarded both ways: every header but hop-by-hop ones (and those `Connection` names), cookies
  and the request id; towards Pleo also credentials, the tenant header, rerouting headers and
  method overrides (`forwarded_request_headers`, `forwarded_response_headers`).
"""

from __future__ import annotations

import enum
import os

from broker import errors
from broker.records import valid_tenant_id

METHOD_OVERRIDE = frozenset(
    {b"x-http-method-override", b"x-method-override", b"x-http-method", b"x-original-method"}
)
REROUTING = frozenset(
    {
        b"forwarded",
        b"x-rewrite-url",
        b"x-real-ip",
        b"x-host",
        b"x-client-ip",
        b"true-client-ip",
        b"x-proxy-url",
    }
)
REROUTING_PREFIXES = (b"x-forwarded-", b"x-original-", b"x-envoy-")
BROWSER_ONLY = frozenset({b"origin", b"sec-fetch-site", b"sec-fetch-dest", b"sec-fetch-user"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_DROP = (
    HOP_BY_HOP
    | REROUTING
    | METHOD_OVERRIDE
    | {b"host", b"authorization", b"cookie", b"x-request-id", b"expect"}
)
RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"x-request-id"}


class BodyKind(enum.Enum):
    """What a request's Content-Type makes of its body."""

    JSON = "json"  # read and checked
    OTHER = "other"  # streamed untouched
    INVALID = "invalid"  # refused


JSON = BodyKind.JSON
OTHER = BodyKind.OTHER
INVALID = BodyKind.INVALID


def body_kind(content_type: bytes | None) -> BodyKind:
    """`JSON` (inspect), `OTHER` (stream untouched) or `INVALID` (refuse) for one Content-Type."""
    if content_type is None:
        return JSON
    media, _, parameters = content_type.partition(b";")
    if b"," in media or (b"," in parameters and _comma_outside_quotes(parameters)):
        return INVALID
    kind, slash, subtype = media.strip().lower().partition(b"/")
    if not slash or not kind or not subtype or b" " in subtype or b" " in kind:
        return INVALID
    return JSON if b"json" in subtype else OTHER


def _comma_outside_quotes(text: bytes) -> bool:
    """True if `text` (media type parameters) has a comma outside a quoted string."""
    quoted = escaped = False
    for byte in text:
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # double quote
            quoted = not quoted
        elif byte == 0x2C and not quoted:  # comma
            return True
    return False


def host_name(bind: str) -> str:
    """The Host spelling of a bind address (an IPv6 address goes in brackets)."""
    return f"[{bind}]" if ":" in bind else bind.lower()


class HostNames:
    """The names the proxy answers to: exact names, `*.suffix` patterns, or `*` for any."""

    def __init__(self, hosts: tuple[str, ...], *, bind: str) -> None:
        hosts = hosts or (*LOOPBACK_NAMES, host_name(bind))
        self.any = "*" in hosts
        self.exact = frozenset(h.encode() for h in hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:].encode() for h in hosts if h.startswith("*."))
        self._seen: set[bytes] = set()  # Host values already allowed (bounded)

    def allows(self, host: bytes | None) -> bool:
        """True if `host` (a Host header, with or without a port) names the broker."""
        if host is None:
            return False
        if self.any or host in self._seen:
            return True
        lowered = host.lower()
        if lowered.startswith(b"["):  # an IPv6 address: `[::1]` or `[::1]:8080`
            end = lowered.find(b"]") + 1
            name, rest = lowered[:end], lowered[end:]
            if not end or (rest and not (rest[:1] == b":" and rest[1:].isdigit())):
                return False
        else:
            name, colon, port = lowered.partition(b":")
            if colon and not port.isdigit():
                return False
        allowed = name in self.exact or (bool(name) and name.endswith(self.suffixes))
        if allowed and len(self._seen) < 1024:
            self._seen.add(host)
        return allowed


# What the body is, as the policy judged it: `Connection` naming one of these must not make Pleo
# see the body undeclared (an undeclared body may be sniffed as JSON, unchecked).
DESCRIBES_BODY = frozenset({b"content-type", b"content-length", b"content-encoding"})


def forwarded_request_headers(
    headers: list[tuple[bytes, bytes]], *, tenant_header: bytes, request_id: bytes
) -> dict[str, str]:
    """The caller's headers to send to Pleo: less credentials, hop-by-hop and rerouting ones,
    the tenant header and the request id (which becomes `request_id`); a repeated header is
    joined as HTTP allows. The key is added at the moment of sending."""
    named_in_connection: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named_in_connection.update(t.strip().lower() for t in value.split(b","))
    named_in_connection -= DESCRIBES_BODY
    out: dict[str, str] = {}
    for name, value in headers:
        if (
            name in REQUEST_DROP
            or name == tenant_header
            or name in named_in_connection
            or name.startswith(REROUTING_PREFIXES)
        ):
            continue
        key = name.decode("latin-1")
        if key in out:
            out[key] += ", " + value.decode("latin-1")
        else:
            out[key] = value.decode("latin-1")
    out["X-Request-Id"] = request_id.decode("latin-1")
    return out


def forwarded_response_headers(
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...],
    *,
    connection: str | None,
    request_id: bytes,
) -> list[tuple[bytes, bytes]]:
    """Pleo's headers to relay (`connection`: its Connection header, whose names are
    hop-by-hop too), with the broker's request id."""
    drop = RESPONSE_DROP
    if connection:
        drop = drop | {t.strip().lower().encode("latin-1") for t in connection.split(",")}
    out = [(name, value) for name, value in headers if name.lower() not in drop]
    out.append((b"x-request-id", request_id))
    return out


_ID_BATCH = 256  # request ids made per read of the system's random source
_ids: list[bytes] = []
# A forked child must not hand out the ids its parent had drawn.
os.register_at_fork(after_in_child=_ids.clear)


def new_request_id() -> bytes:
    """A random UUID4 as 32 hex digits (what `uuid.uuid4().hex` gives), from one `os.urandom`
    per `_ID_BATCH` ids: a system call per request was a third of the cost."""
    if not _ids:
        _ids.extend(_request_ids(_ID_BATCH))
    return _ids.pop()


def _request_ids(count: int) -> list[bytes]:
    raw = bytearray(os.urandom(16 * count))
    for start in range(0, len(raw), 16):
        raw[start + 6] = raw[start + 6] & 0x0F | 0x40
        raw[start + 8] = raw[start + 8] & 0x3F | 0x80
    hexed = raw.hex().encode()
    return [hexed[start : start + 32] for start in range(0, len(hexed), 32)]


_BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Request headers that earn a refusal (or, for Upgrade, may): rare, looked at apart; and the
# caller's Proxy-Authorization (broker.callers).
_RARE = frozenset({b"upgrade", b"proxy-authorization", *BROWSER_ONLY, *METHOD_OVERRIDE})


def _usable_request_id(request_id: bytes) -> bool:
    return bool(request_id) and len(request_id) <= 128 and request_id.isascii()


class RequestHead:
    """What the header rules need from one request's headers, gathered in one pass."""

    __slots__ = (
        "browser",
        "caller",
        "content_type",
        "content_types",
        "has_body",
        "host",
        "lookalike",
        "override",
        "proxy_authorization",
        "request_id",
        "tenant",
        "tenants",
        "upgrade",
        "websocket",
    )

    def __init__(self) -> None:
        self.request_id = b""
        self.tenant: bytes | None = None
        self.tenants = 0
        self.lookalike = False
        self.host: bytes | None = None
        self.content_type: bytes | None = None
        self.content_types = 0
        self.has_body = False
        self.browser = False
        self.upgrade = False
        self.websocket = False
        self.override: bytes | None = None
        self.proxy_authorization: bytes | None = None  # b"" when given twice: names no caller
        self.caller = "anonymous"  # the caller's name, once known (broker.callers)

    def watch(self, name: bytes, value: bytes) -> None:
        """Take one header of `_RARE`: their presence is what counts (and Upgrade's protocol)."""
        if name == b"proxy-authorization":
            self.proxy_authorization = value if self.proxy_authorization is None else b""
        elif name in BROWSER_ONLY:
            self.browser = True
        elif name == b"upgrade":
            self.upgrade = True
            self.websocket = self.websocket or b"websocket" in value.lower()
        else:
            self.override = name


class HeaderRules:
    """The request header rules above, for one tenant header and one set of host names."""

    def __init__(self, tenant_header: str, host_names: HostNames) -> None:
        self.tenant_header_name = tenant_header
        self.tenant_header = tenant_header.lower().encode("latin-1")
        self.tenant_lookalike = self.tenant_header.replace(b"-", b"_")
        self.host_names = host_names
        self._kinds: dict[bytes | None, BodyKind] = {}  # body_kind of Content-Types seen (bounded)

    def read(self, headers: list[tuple[bytes, bytes]]) -> RequestHead:
        """One pass over the request headers; a request id is made up if none usable came."""
        head = RequestHead()
        tenant_header = self.tenant_header
        for name, value in headers:
            if name == tenant_header:
                head.tenant = value
                head.tenants += 1
            elif name == b"host":
                head.host = value if head.host is None else b""  # twice: matches no name
            elif name == b"content-type":
                head.content_type = value
                head.content_types += 1
            elif name in _BODY_FRAMING:
                head.has_body = head.has_body or value != b"0"
            elif name == b"x-request-id":
                head.request_id = value
            elif name in _RARE:
                head.watch(name, value)
            elif name == self.tenant_lookalike:
                head.lookalike = True
        if not _usable_request_id(head.request_id):
            head.request_id = new_request_id()
        return head

    def check(self, head: RequestHead) -> BodyKind | None:
        """Refuse what the headers earn; else what kind of body follows (None: no body)."""
        if not self.host_names.allows(head.host):
            raise errors.HostNotAllowed()
        if head.browser:
            raise errors.BrowserRequestRefused()
        if head.override is not None:
            raise errors.RouteNotAllowed(
                f"The broker forwards the request's own method only; send it as that method"
                f" instead of naming one in {head.override.decode('latin-1').title()}."
            )
        if head.websocket:
            raise errors.RouteNotAllowed(
                "The broker forwards plain HTTP requests to Pleo, not WebSocket connections."
            )
        if head.upgrade and head.has_body:
            # The server reads what follows the headers of an upgrade as the new protocol's,
            # not as the body: the body would be lost or misread.
            raise errors.RouteNotAllowed(
                "The broker forwards plain HTTP/1.1 requests; send this one without the"
                " Upgrade header."
            )
        if head.content_types > 1:
            raise errors.ContentTypeInvalid(
                "Content-Type is given more than once; give it once, with one media type."
            )
        kind = self._kinds.get(head.content_type)
        if kind is None:
            kind = body_kind(head.content_type)
            if len(self._kinds) < 256:
                self._kinds[head.content_type] = kind
        if kind is BodyKind.INVALID:
            raise errors.ContentTypeInvalid()
        return kind if head.has_body else None

    def tenant(self, head: RequestHead) -> str:
        """The tenant the request names, or the refusal its tenant header earns."""
        if head.lookalike:
            raise errors.TenantInvalid(
                "The tenant header must be spelled with dashes, not underscores."
            )
        if head.tenant is None:
            raise errors.TenantMissing(f"Name the tenant in the {self.tenant_header_name} header.")
        if head.tenants > 1:
            raise errors.TenantInvalid("Give the tenant header only once.")
        text = head.tenant.decode("latin-1")
        if not valid_tenant_id(text):
            raise errors.TenantInvalid(tenant=text[:80])
        return text


def named_tenant(head: RequestHead) -> str | None:
    """The well-formed tenant id the request names once, if any (to attribute a refusal)."""
    if head.tenant is None or head.tenants > 1 or head.lookalike:
        return None
    text = head.tenant.decode("latin-1")
    return text if valid_tenant_id(text) else None
