"""Callers (docs/contract.md, README "Callers"): who may use which tenant through the proxy.

`BROKER_CALLERS_FILE` is YAML:

    callers:
      - name: billing                       # a metric label and log field: [a-z0-9_.-], ≤ 63
        token_sha256: "<64 hex digits>"     # `broker callers hash` prints it; never the token
        tenants: ["acme", "beta-*", "*"]    # exact ids, a prefix ending in `*`, or `*` for any
        scopes: ["export-jobs:read"]        # optional: only routes needing one of these

A caller sends `Proxy-Authorization: Bearer <token>` (the scheme in any case, as HTTP allows).
The token's SHA-256 digest is looked up in a table of digests and the hit is compared again
with `hmac.compare_digest`: the time taken depends only on the digest of what the caller sent,
never on how much of a stored token it guessed. A bad file is refused with one line naming the
entry and what is wrong, never a token or a hash; a key given twice in one mapping is refused
(YAML's usual last-one-wins would let `tenants: ['*']` below a narrower list widen the caller).
A caller with `scopes` may use only routes whose scope is in its list: routes that need no
scope (`/v1/introspect`, the installation routes, control plane included) are refused to it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import errors
from broker.records import valid_tenant_id

ANONYMOUS = "anonymous"  # the `caller` label when no callers file is set
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_HASH = re.compile(r"[0-9a-f]{64}")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._-]*")
_FIELDS = frozenset({"name", "token_sha256", "tenants", "scopes"})
_SEPARATORS = "-_."  # what a tenant prefix pattern ends in before its `*`


class CallersFileError(errors.ConfigError):
    """The callers file cannot be used; the message is one line naming the bad entry."""


def token_hash(token: str) -> str:
    """The `token_sha256` of a caller token (hex)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    """One entry of the callers file, its patterns precomputed."""

    name: str
    digest: bytes
    any_tenant: bool
    tenants: frozenset[str]
    prefixes: tuple[str, ...]
    scopes: frozenset[str] | None  # None: every route

    def allows_tenant(self, tenant: str) -> bool:
        return self.any_tenant or tenant in self.tenants or tenant.startswith(self.prefixes)

    def allows_scope(self, scope: str | None) -> bool:
        """A caller without `scopes` may use every route; one with `scopes` only the routes
        whose scope is in its list (a route needing no scope is in none)."""
        return self.scopes is None or (scope is not None and scope in self.scopes)


# `Proxy-Authorization` values a table remembers as naming a caller (more: it starts over).
KNOWN_VALUES = 1024
KNOWN_VALUE_BYTES = 256  # and only values this long at most (a token's is ~70 bytes)


class CallerTable:
    """The callers of one version of the file, by the digest of their token."""

    def __init__(self, callers: Iterable[Caller]) -> None:
        self.by_digest = {caller.digest: caller for caller in callers}
        self.names = tuple(sorted(caller.name for caller in self.by_digest.values()))
        # `Proxy-Authorization` values already found to name a caller, as received: a service
        # sends the same value on every request, which then costs one look-up instead of a
        # SHA-256 (a look-up keyed by a randomly seeded hash: it times nothing of a token).
        # Only values that named a caller go in, at most KNOWN_VALUES; a new version of the
        # file is a new table, so a caller removed from it is not remembered.
        self._known: dict[bytes, Caller] = {}

    def __len__(self) -> int:
        return len(self.by_digest)

    def identify(self, header: bytes | None) -> Caller:
        """The caller a `Proxy-Authorization` value names, or `401 caller_unauthenticated`."""
        if header is None:
            raise errors.CallerUnauthenticated()
        known = self._known.get(header)
        if known is not None:
            return known
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise errors.CallerUnauthenticated(
                "Send the caller token as 'Proxy-Authorization: Bearer <token>'."
            )
        digest = hashlib.sha256(token.strip()).digest()
        caller = self.by_digest.get(digest)
        if caller is None or not hmac.compare_digest(caller.digest, digest):
            raise errors.CallerUnauthenticated(
                "The caller token in Proxy-Authorization is not one this broker knows."
            )
        if len(header) <= KNOWN_VALUE_BYTES:  # a padded spelling is let in, not kept
            if len(self._known) >= KNOWN_VALUES:
                self._known.clear()  # a caller sending ever new values gains nothing
            self._known[header] = caller
        return caller


def load_callers(path: Path) -> CallerTable:
    """Read and validate the callers file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CallersFileError(f"callers file {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CallersFileError(f"callers file {path}: is not UTF-8 text") from None
    return parse_callers(text, str(path))


def _duplicate(mapping: object) -> str | None:
    """The first key a YAML mapping was given twice (`callers_yaml.NotedMapping`), or None."""
    noted = getattr(mapping, "duplicate", None)
    return noted if isinstance(noted, str) else None


def parse_callers(text: str, source: str = "callers file") -> CallerTable:
    """Validate a callers file's text; `CallersFileError` names the first bad entry."""
    from broker.callers_yaml import YamlSyntaxError, load_document  # PyYAML: with a file only

    try:
        document = load_document(text)
    except YamlSyntaxError as exc:
        where = f" (line {exc.line})" if exc.line is not None else ""
        raise CallersFileError(f"{source}: is not valid YAML{where}") from None
    if not isinstance(document, dict) or set(document) != {"callers"}:
        raise CallersFileError(f"{source}: must be a mapping with one key, 'callers'")
    if _duplicate(document) is not None:
        raise CallersFileError(f"{source}: the key 'callers' is given twice")
    entries = document["callers"]
    if not isinstance(entries, list):
        raise CallersFileError(f"{source}: 'callers' must be a list of callers")
    callers: list[Caller] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, entry in enumerate(entries, start=1):
        label = _label(number, entry)
        try:
            caller = _caller(entry)
        except ValueError as exc:
            raise CallersFileError(f"{source}: {label}: {exc}") from None
        if caller.name in names:
            raise CallersFileError(f"{source}: {label}: the name is used by an earlier entry")
        if caller.digest in digests:
            raise CallersFileError(
                f"{source}: {label}: token_sha256 is the same as an earlier entry's"
            )
        names.add(caller.name)
        digests.add(caller.digest)
        callers.append(caller)
    return CallerTable(callers)


def _label(number: int, entry: object) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    if isinstance(name, str) and _NAME.fullmatch(name):
        return f"caller {number} ({name})"
    return f"caller {number}"


def _caller(entry: object) -> Caller:
    if not isinstance(entry, dict):
        raise ValueError("must be a mapping with name, token_sha256 and tenants")
    unknown = sorted(str(key) for key in set(entry) - _FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field {unknown[0][:40]!r} (known: name, token_sha256, tenants, scopes)"
        )
    duplicate = _duplicate(entry)
    if duplicate is not None:
        raise ValueError(f"the field {duplicate!r} is given twice")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == ANONYMOUS:
        raise ValueError(
            "'name' must be 1-63 characters of a-z, 0-9, '_', '.', '-' (not 'anonymous')"
        )
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _HASH.fullmatch(digest.lower()):
        raise ValueError(
            "'token_sha256' must be 64 hex digits, the SHA-256 of the token"
            " (`broker callers hash` prints it)"
        )
    tenants = _strings(entry.get("tenants"), "tenants")
    for pattern in tenants:
        _check_pattern(pattern)
    scopes = entry.get("scopes")
    scope_set = None
    if scopes is not None:
        scope_set = frozenset(_strings(scopes, "scopes"))
        for scope in scope_set:
            if not _SCOPE.fullmatch(scope):
                raise ValueError(f"scope {scope[:80]!r} is not of the form resource:action")
    return Caller(
        name=name,
        digest=bytes.fromhex(digest),
        any_tenant="*" in tenants,
        tenants=frozenset(t for t in tenants if not t.endswith("*")),
        prefixes=tuple(t[:-1] for t in tenants if t.endswith("*") and t != "*"),
        scopes=scope_set,
    )


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{field}' must be a non-empty list of strings")
    return list(value)


def _check_pattern(pattern: str) -> None:
    if pattern == "*":
        return
    stem = pattern[:-1] if pattern.endswith("*") else pattern
    # A prefix is the start of a tenant id up to a separator: `acme-*` matches `acme-eu`, and
    # `acme*` (which would match `acmex` too) is refused. Completing it with a letter makes a
    # valid tenant id.
    prefix = stem != pattern
    if (
        "*" in stem
        or not stem
        or (prefix and stem[-1] not in _SEPARATORS)
        or not valid_tenant_id(stem + ("a" if prefix else ""))
    ):
        raise ValueError(
            f"tenant pattern {pattern[:80]!r} must be a tenant id, a prefix ending in a"
            " separator and '*' (acme-*, acme_*, acme.*), or '*'"
        )
