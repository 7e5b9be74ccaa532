"""The proxy policy: pure functions deciding allow, deny or rewrite (docs/contract.md, "The proxy").

In order:

1. The request target must be a canonical origin-form path: it starts with `/`, has no `//`,
   no `;`, no `.` or `..` segment, no backslash, no control or non-ASCII byte, no character outside
   RFC 3986 path characters, only well-formed percent escapes, and none that decodes to `.`,
   `/`, `\\` or a control character. `CONNECT` and `TRACE` are refused. The decoded path must
   match a catalog route that accepts API keys (not `bearer_only`).
2. The route's scope, if it has one, must be granted to the tenant.
3. Every company id must be the tenant's (UUIDs compared case-insensitively): the path parameter,
   every query parameter named like `company_id` / `companyId` (any case, `_` or `-`, and any
   bracketed form: `company_id[]`, `company_id[0]`, `companyId[x]`, `company[id]`), and a
   top-level `companyId` of an inspected JSON body. An `organization_id` (same spellings) is
   refused. Where the route takes a company id in the query or body and the caller left it out,
   the broker fills in the tenant's. A route that carries the company in its body takes a JSON
   object only (anything else is `body_invalid`); on other routes a top-level array has each of
   its objects checked like a body, so no company id hides in a list. A `_method` query
   parameter (a method override) is refused: the decision is made on the request's own method.
4. What to do with a body (`BodyHandling`): read and check it as JSON where the route carries
   the company in it (on a body method) and wherever the body is declared JSON or not declared
   at all (`broker.headers.body_kind`); stream any other body untouched.

Query parameters are split on `&` and `;` for checking, so a server that treats `;` as a
separator cannot be handed a company id the broker did not see. The forwarded path and query
stay byte-identical to the caller's except for a filled-in company id.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn
from urllib.parse import quote, unquote, unquote_to_bytes

from broker.catalog import METHODS, Catalog, Route
from broker.errors import BodyInvalid, CompanyMismatch, RouteNotAllowed, ScopeNotGranted
from broker.headers import BodyKind

REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
BODY_METHODS = METHODS - {"GET", "HEAD", "OPTIONS"}

# RFC 3986 `pchar` plus `/`: unreserved, sub-delims, ':', '@', and '%' for escapes.
_PATH_BYTES = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_REFUSED_ESCAPES = frozenset({ord("."), ord("/"), ord("\\"), 0x7F, *range(0x20)})
_COMPANY_NAMES = frozenset({"companyid"})
_ORGANIZATION_NAMES = frozenset({"organizationid", "organisationid"})
_NOT_CANONICAL = "The request target is not a canonical Pleo path"


class BodyHandling(enum.Enum):
    """What the proxy does with a request's body."""

    NONE = "none"  # there is none: send none
    STREAM = "stream"  # stream it to Pleo untouched
    INSPECT_JSON = "inspect_json"  # read it whole, check it (`check_body`), send the result


class Decision(NamedTuple):
    """What to forward: the route, the path as received, the query to send, and what to do
    with the body. A tuple: as immutable as a frozen dataclass, made in less than half its
    time (once a request)."""

    route: Route
    path: str
    query_string: bytes
    body: BodyHandling

    @property
    def inspect_body(self) -> bool:
        """True if the body is read and checked before it is sent."""
        return self.body is BodyHandling.INSPECT_JSON


def body_handling(route: Route, method: str, content: BodyKind | None) -> BodyHandling:
    """What to do with the body of `method` on `route`, given its kind (None: no body)."""
    if (route.body_company is not None and method in BODY_METHODS) or content is BodyKind.JSON:
        return BodyHandling.INSPECT_JSON
    if content is BodyKind.OTHER:
        return BodyHandling.STREAM
    return BodyHandling.NONE


@dataclass(frozen=True, slots=True)
class Policy:
    """The policy over one route catalog, with what the operator allows beyond it."""

    catalog: Catalog
    allow_control_plane: bool = False

    def decide(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        *,
        company_id: str,
        scopes: frozenset[str],
        content: BodyKind | None = None,
    ) -> Decision:
        """Allow, rewrite or refuse one request; raises a PolicyDenied error to refuse.

        `content` is the kind of body the request has (None: none)."""
        return self.locate(method, raw_path, query_string, content).for_tenant(company_id, scopes)

    def locate(
        self, method: str, raw_path: bytes, query_string: bytes, content: BodyKind | None = None
    ) -> Located:
        """The part of a decision that holds for every tenant: the route (refusing what no
        tenant may send) and what the query holds; `Located.for_tenant` finishes it."""
        if method in REFUSED_METHODS:
            raise RouteNotAllowed(f"The broker does not forward {method} requests.")
        path = _canonical_path(raw_path)
        found = self.catalog.match(method, path)
        if found is None:
            raise RouteNotAllowed(
                f"{method} {_shorten(path)} is not a Pleo route the broker forwards"
                " (see `broker catalog`)."
            )
        route = found.route
        if route.bearer_only:
            raise RouteNotAllowed(
                f"{method} {route.template} accepts only OAuth bearer tokens;"
                " the broker holds API keys."
            )
        if route.control_plane and not self.allow_control_plane:
            raise RouteNotAllowed(
                f"{method} {route.template} belongs to the integration's control plane (its"
                " installation in Pleo), which the proxy does not forward; an operator can allow"
                " it with BROKER_PROXY_ALLOW_CONTROL_PLANE=true."
            )
        checks, named = _query_checks(query_string)
        field = route.query_company
        fill = field is not None and not any(
            f.name in named for f in route.company if f.location == "query"
        )
        prefix = f"{quote(field.name, safe='')}=".encode("ascii") if fill and field else b""
        return Located(
            route=route,
            method=method,
            path=raw_path.decode("ascii"),
            path_company=found.params[route.path_company] if route.path_company else None,
            query_string=query_string,
            query_checks=checks,
            fill=prefix,
            body=body_handling(route, method, content),
        )


@dataclass(frozen=True, slots=True)
class Located:
    """A request's route and what its path and query name (`Policy.locate`): the same for
    every tenant, so one is kept per target while 50,000 tenants take turns."""

    route: Route
    method: str
    path: str
    path_company: str | None  # the company id the path names (None: the route has none)
    query_string: bytes
    # What the query names, in its order: ("override" | "organisation" | "company", name, value).
    query_checks: tuple[tuple[str, str, str], ...]
    fill: bytes  # `name=` of the route's query company when absent (the tenant's is added)
    body: BodyHandling

    def for_tenant(self, company_id: str, scopes: frozenset[str]) -> Decision:
        """The decision for a tenant of `company_id` granted `scopes`; raises to refuse."""
        route = self.route
        if route.scope is not None and route.scope not in scopes:
            raise ScopeNotGranted(
                f"{self.method} {route.template} needs the scope {route.scope!r},"
                " which this tenant's key was not granted.",
                required_scope=route.scope,
            )
        if self.path_company is not None and self.path_company.lower() != company_id.lower():
            raise CompanyMismatch(
                f"The path names company {_shorten(self.path_company)!r}"
                f" but this tenant is connected to company {company_id!r}."
            )
        for kind, name, value in self.query_checks:
            _check_query_parameter(kind, name, value, company_id)
        query_string = self.query_string
        if self.fill:
            addition = self.fill + _quoted(company_id)
            if query_string and not query_string.endswith(b"&"):
                addition = b"&" + addition
            query_string += addition
        return Decision(route, self.path, query_string, self.body)  # positional: faster


class Decisions:
    """`Policy.decide`, with the tenant-independent part remembered: where a request goes
    (`Policy.locate`) is a pure function of its method, target, query and body kind, and the
    same few are asked again and again, by one tenant or by 50,000 in turn. The tenant's part
    (scope, company, the filled-in company id: `Located.for_tenant`) is decided every time,
    and so is every refusal (a target refused for every tenant is not remembered).

    At most `size` targets are kept (all forgotten when full), and only those of at most
    `max_target` bytes, so a flood of distinct or long targets costs bounded memory.
    """

    def __init__(self, policy: Policy, size: int = 4096, max_target: int = 512) -> None:
        self.policy = policy
        self.size = size
        self.max_target = max_target
        self._known: dict[tuple[object, ...], Located] = {}

    def decide(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        *,
        company_id: str,
        scopes: frozenset[str],
        content: BodyKind | None = None,
    ) -> Decision:
        key = (method, raw_path, query_string, content)
        located = self._known.get(key)
        if located is None:
            located = self.policy.locate(method, raw_path, query_string, content)
            if len(raw_path) + len(query_string) <= self.max_target:
                if len(self._known) >= self.size:
                    self._known.clear()
                self._known[key] = located
        return located.for_tenant(company_id, scopes)


def check_body(route: Route, body: bytes, *, company_id: str) -> bytes:
    """The JSON body to forward: checked, with the company id filled in where it is missing."""
    try:
        document = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise BodyInvalid(f"The request body is not valid JSON: {_reason(exc)}.") from None
    if not isinstance(document, dict):
        if route.body_company is not None:
            raise BodyInvalid(
                f"The request body must be a JSON object: {route.method} {route.template}"
                f" carries the company id in its {route.body_company.name!r} member."
            )
        _check_array(document, company_id)
        return body
    present = _check_members(document, company_id)
    field = route.body_company
    if present or field is None:
        return body
    # Insert the field as the object's first member: every other byte stays as sent.
    brace = body.index(b"{") + 1
    member = json.dumps({field.name: company_id}, separators=(",", ":"))[1:-1].encode()
    return body[:brace] + member + (b"," if document else b"") + body[brace:]


def _check_members(document: dict[str, Any], company_id: str) -> bool:
    """Refuse a top-level company id that is not the tenant's, or an organisation; True if the
    object names the company."""
    present = False
    for key, value in document.items():
        normalised = _normalise(key)
        if normalised in _ORGANIZATION_NAMES:
            raise CompanyMismatch(
                f"The body names an organisation ({key!r}); the broker keeps requests"
                " inside this tenant's company."
            )
        if normalised in _COMPANY_NAMES:
            present = True
            if not isinstance(value, str) or value.lower() != company_id.lower():
                raise CompanyMismatch(
                    f"The body names company {_shorten(json.dumps(value))} in {key!r}"
                    f" but this tenant is connected to company {company_id!r}."
                )
    return present


def _check_array(document: object, company_id: str) -> None:
    """Every object of a top-level array (arrays of arrays too) is checked like a body."""
    if not isinstance(document, list):
        return
    pending = [document]
    while pending:
        for element in pending.pop():
            if isinstance(element, dict):
                _check_members(element, company_id)
            elif isinstance(element, list):
                pending.append(element)


def _canonical_path(raw_path: bytes) -> str:
    """The percent-decoded path, or RouteNotAllowed if the target is not canonical."""
    if not raw_path.startswith(b"/"):
        form = "an absolute URL" if b"://" in raw_path else "not an origin-form path"
        raise RouteNotAllowed(f"{_NOT_CANONICAL}: it is {form}; send only the path.")
    if b"//" in raw_path:
        raise RouteNotAllowed(f"{_NOT_CANONICAL}: it contains '//'.")
    if not _PATH_BYTES.issuperset(raw_path):
        raise RouteNotAllowed(
            f"{_NOT_CANONICAL}: it contains a character that must be percent-encoded,"
            " a backslash or a control character."
        )
    if b";" in raw_path:
        # Servlet containers read `;` as the start of path parameters (`/a/..;/b` is `/a/../b`
        # there); no Pleo route has one, so none is forwarded.
        raise RouteNotAllowed(f"{_NOT_CANONICAL}: it contains ';' (a path parameter).")
    for segment in raw_path.split(b"/"):
        if segment in (b".", b".."):
            raise RouteNotAllowed(f"{_NOT_CANONICAL}: it contains a '.' or '..' segment.")
    _check_escapes(raw_path)
    try:
        return unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise RouteNotAllowed(f"{_NOT_CANONICAL}: it does not decode to UTF-8.") from None


def _check_escapes(raw_path: bytes) -> None:
    """Refuse a malformed percent escape, or one of a character no canonical path encodes."""
    position = raw_path.find(b"%")
    while position != -1:
        escape = raw_path[position + 1 : position + 3]
        if len(escape) != 2 or not _HEX.issuperset(escape):
            raise RouteNotAllowed(f"{_NOT_CANONICAL}: it contains a malformed percent escape.")
        if int(escape, 16) in _REFUSED_ESCAPES:
            raise RouteNotAllowed(
                f"{_NOT_CANONICAL}: it percent-encodes a dot, a slash, a backslash"
                " or a control character."
            )
        position = raw_path.find(b"%", position + 3)


def _query_checks(query_string: bytes) -> tuple[tuple[tuple[str, str, str], ...], set[str]]:
    """What the query names that the policy checks, in order (a method override, an
    organisation, a company id, each with its name and decoded value), and every name in it."""
    checks: list[tuple[str, str, str]] = []
    names: set[str] = set()
    if not query_string:
        return (), names
    for part in query_string.replace(b";", b"&").split(b"&"):
        raw_name, _, raw_value = part.partition(b"=")
        name = unquote(raw_name.replace(b"+", b" ").decode("latin-1"), errors="replace")
        normalised = _normalise(name)
        if normalised == "method" and name.startswith("_"):
            checks.append(("override", name, ""))
        elif normalised in _ORGANIZATION_NAMES:
            checks.append(("organisation", name, ""))
        elif normalised in _COMPANY_NAMES:
            value = unquote(raw_value.replace(b"+", b" ").decode("latin-1"), errors="replace")
            checks.append(("company", name, value))
        names.add(name)
    return tuple(checks), names


def _check_query_parameter(kind: str, name: str, value: str, company_id: str) -> None:
    """Refuse a query parameter `_query_checks` found, unless it is the tenant's company."""
    if kind == "override":
        raise RouteNotAllowed(
            f"The query names {name!r}, a method override; the broker forwards the"
            " request's own method only, so send that method instead."
        )
    if kind == "organisation":
        raise CompanyMismatch(
            f"The query names an organisation ({name!r}); the broker keeps requests"
            " inside this tenant's company."
        )
    if value.lower() != company_id.lower():
        raise CompanyMismatch(
            f"The query names company {_shorten(value)!r} in {name!r}"
            f" but this tenant is connected to company {company_id!r}."
        )


def _quoted(value: str) -> bytes:
    """`value` percent-encoded for a query (a company id, a UUID, needs none: no call to
    `quote` then, which 50,000 tenants taking turns would make on every request)."""
    if value.isascii():
        raw = value.encode("ascii")
        if not raw.translate(None, _UNRESERVED_BYTES):  # nothing but unreserved characters
            return raw
    return quote(value, safe="").encode("ascii")


def _normalise(name: str) -> str:
    """Letters and digits only: `company_id`, `Company-Id` and `company_id[]` are one name,
    and an indexed name (`company_id[0]`, `companyId[x][y]`) is the name it starts with."""
    bracket = name.find("[")
    if bracket > 0:
        head = _alphanumeric(name[:bracket])
        if head in _COMPANY_NAMES or head in _ORGANIZATION_NAMES:
            return head
    return _alphanumeric(name)


def _alphanumeric(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("an object names the same key twice")
    return document


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8"
    return str(exc)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
