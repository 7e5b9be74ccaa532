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
  like every hop-by-hop header; a WebSocket handshake is refused by the proxy itself.
- Headers that make a server, or a proxy in front of it, use another URL, host, scheme or client
  (`REROUTING`, `REROUTING_PREFIXES`) are dropped before Pleo.
- `Content-Type` (`body_kind`): one media type, given once. A subtype containing `json`
  (`application/json`, `text/json`, `application/…+json`, `application/x-ndjson`) or no
  `Content-Type` at all means the body is read and checked as JSON, because frameworks differ in
  what they parse as JSON and an undeclared body may be sniffed; any other media type streams
  untouched. A list (`text/plain, application/json`), an empty or a malformed media type is
  refused, since servers differ in which member of a list they believe.
"""

from __future__ import annotations

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

JSON = "json"
OTHER = "other"
INVALID = "invalid"


def body_kind(content_type: bytes | None) -> str:
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
