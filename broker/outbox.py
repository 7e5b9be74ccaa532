"""Events of docs/contract.md, "Events": every state change of a tenant, as the feed serves it.

An event is `{"id", "type", "timestamp", "actor", "data"}`, `data` being the tenant view of
the admin API (never the key). It is written by the store in the same atomic write as the
change it describes (`SecretStore.put(record, events=…)`, `delete(tenant, events=…)`), so
there is no change without its event and no event without its change. `TenantBook` is the
one place that builds them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

EVENT_TYPES = (
    "tenant.activated",
    "tenant.key_rotated",
    "tenant.company_changed",
    "tenant.scopes_changed",
    "tenant.broken",
    "tenant.recovered",
    "tenant.disconnected",
    "connect_session.completed",
    "tenant.installation_changed",
)
ACTORS = ("admin", "proxy", "health_check", "cli")
_SESSION_ACTOR = re.compile(r"connect_session:[A-Za-z0-9_-]{1,80}")


def valid_actor(actor: str) -> bool:
    """Whether `actor` is one of the actors an event may name."""
    return actor in ACTORS or _SESSION_ACTOR.fullmatch(actor) is not None


@dataclass(frozen=True, slots=True)
class Event:
    """One state change: what happened, when, who caused it, and the tenant as it is now."""

    id: str
    type: str
    timestamp: str
    actor: str
    tenant: str
    data: Mapping[str, Any]
    caller: str | None = None  # actor `proxy`: the callers file's name of who made the call

    def body(self) -> dict[str, Any]:
        """The event as the feed serves it (`caller` only when there is one)."""
        body = {
            "id": self.id,
            "type": self.type,
            "timestamp": self.timestamp,
            "actor": self.actor,
            "data": dict(self.data),
        }
        if self.caller is not None:
            body["caller"] = self.caller
        return body

    def dumps(self) -> str:
        """The event as stored (JSON)."""
        return json.dumps(self.body(), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Event:
        """An event stored by `dumps`."""
        body = json.loads(text)
        data = body["data"]
        return cls(
            id=str(body["id"]),
            type=str(body["type"]),
            timestamp=str(body["timestamp"]),
            actor=str(body["actor"]),
            tenant=str(data["tenant"]),
            data=data,
            caller=str(body["caller"]) if body.get("caller") is not None else None,
        )


def new_event(
    kind: str,
    actor: str,
    view: Mapping[str, Any],
    *,
    now: datetime | None = None,
    caller: str | None = None,
) -> Event:
    """A new event of `kind` caused by `actor` about the tenant `view` shows."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    if not valid_actor(actor):
        raise ValueError(f"unknown actor {actor!r}")
    moment = now if now is not None else datetime.now(UTC)
    return Event(
        id=f"evt_{uuid.uuid4().hex}",
        type=kind,
        timestamp=stamp(moment),
        actor=actor,
        tenant=str(view["tenant"]),
        data=dict(view),
        caller=caller,
    )


def stamp(moment: datetime) -> str:
    """An event's timestamp: UTC, milliseconds, `Z` (sorts as it reads)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
