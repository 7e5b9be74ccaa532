"""Connect sessions: one-time links to the connect page (docs/contract.md, "Connect page").

A session binds a random token (256 bits, `secrets.token_urlsafe(32)`) to one tenant. Only the
token's SHA-256 is stored, in the broker's store, so every replica accepts the link; logs and
events name the session's id, never its token. A session ends on success (single use), on
expiry, on revocation, or after `BROKER_CONNECT_MAX_ATTEMPTS` failed submissions.

Stores keep sessions as compare-and-set documents keyed by the token's hash (`SessionStore`);
a store that keeps none falls back to `SessionTable`, in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from broker import errors
from broker.book import require_valid
from broker.events import emit
from broker.settings import Settings

MIN_TTL = 60
MAX_TTL = 86_400
DEFAULT_TTL = 1800
CLAIM_FOR = timedelta(seconds=60)  # longer than a key's check with Pleo may take
SessionData = dict[str, object]


def token_hash(token: str) -> str:
    """The SHA-256 hex of a link's token: the only form in which a token is kept."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ConnectSession:
    """One connect link's state (never its token)."""

    id: str
    tenant: str
    token_hash: str
    expires_at: datetime
    attempts: int = 0
    allow_company_change: bool = False
    return_url: str | None = None
    last_error: str | None = None  # the code of the last failed submission
    csrf: str = ""  # the page's form token (random per session; not a secret beyond it)
    busy_until: datetime | None = None  # a submission is being checked (see `claim`)
    version: int = 0  # compare-and-set: 0 for a session not stored yet

    def view(self) -> dict[str, object]:
        """The admin API's view: everything but the token's hash."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "expires_at": self.expires_at.isoformat(),
            "attempts": self.attempts,
            "allow_company_change": self.allow_company_change,
            "return_url": self.return_url,
        }

    def expired(self, now: datetime) -> bool:
        """True once the link's time is up."""
        return now >= self.expires_at

    def to_data(self) -> SessionData:
        """The stored document (without the version, which the store keeps)."""
        data = asdict(self)
        data.pop("version")
        data["expires_at"] = self.expires_at.isoformat()
        data["busy_until"] = self.busy_until.isoformat() if self.busy_until else None
        return data

    @classmethod
    def from_data(cls, data: dict[str, object], version: int) -> ConnectSession:
        """The session a stored document holds."""
        return cls(
            id=str(data["id"]),
            tenant=str(data["tenant"]),
            token_hash=str(data["token_hash"]),
            expires_at=datetime.fromisoformat(str(data["expires_at"])),
            attempts=int(str(data.get("attempts") or 0)),
            allow_company_change=data.get("allow_company_change") is True,
            return_url=str(data["return_url"]) if data.get("return_url") else None,
            last_error=str(data["last_error"]) if data.get("last_error") else None,
            csrf=str(data.get("csrf") or ""),
            busy_until=(
                datetime.fromisoformat(str(data["busy_until"])) if data.get("busy_until") else None
            ),
            version=version,
        )


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live; `put_session` is compare-and-set on `version` (0: new)."""

    async def put_session(self, session: ConnectSession) -> ConnectSession: ...

    async def get_session(self, token_hash: str) -> ConnectSession | None: ...

    async def list_sessions(self) -> list[ConnectSession]: ...

    async def delete_session(self, token_hash: str) -> bool: ...


class SessionTable:
    """Sessions in this process's memory, for a store that keeps none."""

    def __init__(self) -> None:
        self._sessions: dict[str, ConnectSession] = {}
        self._lock = asyncio.Lock()

    async def put_session(self, session: ConnectSession) -> ConnectSession:
        async with self._lock:
            current = self._sessions.get(session.token_hash)
            if (current.version if current else 0) != session.version:
                raise errors.StoreConflict(tenant=session.tenant)
            stored = replace(session, version=session.version + 1)
            self._sessions[session.token_hash] = stored
            return stored

    async def get_session(self, token_hash: str) -> ConnectSession | None:
        return self._sessions.get(token_hash)

    async def list_sessions(self) -> list[ConnectSession]:
        return list(self._sessions.values())

    async def delete_session(self, token_hash: str) -> bool:
        return self._sessions.pop(token_hash, None) is not None


@dataclass(frozen=True, slots=True)
class NewLink:
    """A created session and its link (the token is in `url`, shown once)."""

    session: ConnectSession
    url: str

    def view(self) -> dict[str, object]:
        """`201` body of `POST /v1/tenants/{tenant}/connect-sessions`."""
        return {
            "id": self.session.id,
            "tenant": self.session.tenant,
            "url": self.url,
            "expires_at": self.session.expires_at.isoformat(),
        }


class ConnectSessions:
    """Creates, finds, counts and ends connect sessions."""

    def __init__(self, store: SessionStore, settings: Settings) -> None:
        self.store = store
        self.public_url = settings.connect_public_url
        self.return_origins = frozenset(settings.connect_return_origins)
        self.max_attempts = settings.connect_max_attempts

    async def create(
        self,
        tenant: str,
        *,
        ttl_seconds: int = DEFAULT_TTL,
        return_url: str | None = None,
        allow_company_change: bool = False,
    ) -> NewLink:
        """A new session for `tenant` and its link (the tenant need not exist yet)."""
        if self.public_url is None:
            raise errors.ConnectDisabled()
        require_valid(tenant)
        if not MIN_TTL <= ttl_seconds <= MAX_TTL:
            raise errors.RequestInvalid(f"ttl_seconds must be {MIN_TTL} to {MAX_TTL}.")
        if return_url is not None:
            self._require_allowed(return_url)
        token = secrets.token_urlsafe(32)
        session = ConnectSession(
            id="cs_" + secrets.token_hex(8),
            tenant=tenant,
            token_hash=token_hash(token),
            expires_at=_now() + timedelta(seconds=ttl_seconds),
            allow_company_change=allow_company_change,
            return_url=return_url,
            csrf=secrets.token_urlsafe(32),
        )
        session = await self.store.put_session(session)
        emit("connect.session_created", tenant=tenant, session=session.id, ttl=ttl_seconds)
        return NewLink(session, f"{self.public_url}/connect/{token}")

    def _require_allowed(self, return_url: str) -> None:
        parts = urlsplit(return_url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        if parts.scheme not in ("http", "https") or origin not in self.return_origins:
            raise errors.RequestInvalid(
                "return_url must be on an origin listed in BROKER_CONNECT_RETURN_ORIGINS."
            )

    async def open_for(self, tenant: str) -> list[ConnectSession]:
        """The tenant's open sessions; ended ones found on the way are removed."""
        require_valid(tenant)
        found = []
        for session in await self.store.list_sessions():
            if not await self._still_open(session):
                continue
            if session.tenant == tenant:
                found.append(session)
        return sorted(found, key=lambda s: s.expires_at)

    async def revoke(self, session_id: str) -> None:
        """End the session with this id now (`ConnectSessionUnknown` if none is open)."""
        for session in await self.store.list_sessions():
            if session.id == session_id and await self._still_open(session):
                await self.store.delete_session(session.token_hash)
                emit("connect.session_revoked", tenant=session.tenant, session=session.id)
                return
        raise errors.ConnectSessionUnknown()

    async def find(self, token: str) -> ConnectSession | None:
        """The open session a link's token names, or None (unknown, ended or expired)."""
        if not token or len(token) > 128:
            return None
        session = await self.store.get_session(token_hash(token))
        if session is None or not await self._still_open(session):
            return None
        return session

    async def claim(self, session: ConnectSession) -> ConnectSession:
        """Mark the session busy while a submitted key is checked: of two submissions at once,
        on any replica, one wins and the other gets `StoreConflict` (so a link is used once)."""
        now = _now()
        if session.busy_until is not None and session.busy_until > now:
            raise errors.StoreConflict("Another submission on this link is being checked.")
        return await self.store.put_session(replace(session, busy_until=now + CLAIM_FOR))

    async def release(self, session: ConnectSession) -> ConnectSession:
        """The claimed submission ended without counting (a confirmation is asked for)."""
        return await self.store.put_session(replace(session, busy_until=None))

    async def failed(self, session: ConnectSession, code: str) -> ConnectSession:
        """Count a failed submission; the session ends at the attempt limit."""
        counted = replace(session, attempts=session.attempts + 1, last_error=code, busy_until=None)
        stored = await self.store.put_session(counted)
        emit(
            "connect.attempt_failed",
            tenant=session.tenant,
            session=session.id,
            attempts=stored.attempts,
            reason=code,
        )
        if stored.attempts >= self.max_attempts:
            await self.store.delete_session(session.token_hash)
            emit("connect.session_exhausted", tenant=session.tenant, session=session.id)
        return stored

    async def completed(self, session: ConnectSession) -> None:
        """The key was accepted: the link is used up."""
        await self.store.delete_session(session.token_hash)
        emit("connect.session_completed", tenant=session.tenant, session=session.id)

    async def _still_open(self, session: ConnectSession) -> bool:
        if session.expired(_now()) or session.attempts >= self.max_attempts:
            # Tidying up is best effort: a store that takes no writes still refuses the link.
            with contextlib.suppress(errors.StoreError):
                await self.store.delete_session(session.token_hash)
            return False
        return True


def _now() -> datetime:
    return datetime.now(UTC)
