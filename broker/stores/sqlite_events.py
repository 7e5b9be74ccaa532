"""The local store's event log and outbox: table `events`, one row an event, in write order.

Events are inserted in the transaction of the change they describe (`insert`, called by the
store's put and delete), so a failed write leaves none. `seq` orders the feed; the delivery
columns (`attempts`, `claimed_by`, `claimed_until`, `delivered_at`) are for a webhook
deliverer to lease an event (one replica at a time) and mark it delivered. Every function is
blocking and runs on the store's worker thread.

Delivery (`claim`, `settle`, `pending`): an event is pending while `delivered_at` is NULL;
`outcome` says how it ended (`delivered` or `given_up`). `claimed_until` is both the lease of
`claimed_by` and, once an attempt failed, the time of the retry (with `claimed_by` NULL): an
event is due when it is its tenant's oldest pending one and `claimed_until` has passed. A
claim is one write transaction, so two processes on one file never claim the same event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from broker.delivery import Delivery, Settlement
from broker.outbox import Event, stamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    body          TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    claimed_until TEXT,
    delivered_at  TEXT
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS events_by_tenant ON events (tenant, seq)"
_PENDING_INDEX = (
    "CREATE INDEX IF NOT EXISTS events_pending ON events (tenant, seq) WHERE delivered_at IS NULL"
)
# Each tenant's oldest pending event, found from the partial index of pending events only (a
# delivered event costs the claim nothing), then read by its key.
_DUE = """
SELECT e.seq, e.body, e.attempts FROM
  (SELECT min(seq) AS first FROM events WHERE delivered_at IS NULL GROUP BY tenant) AS heads
  JOIN events AS e ON e.seq = heads.first
WHERE e.claimed_until IS NULL OR e.claimed_until <= ?
ORDER BY e.seq LIMIT ?
"""


def create(conn: sqlite3.Connection) -> None:
    """Add the table to a store made before it (runs in the open's transaction)."""
    conn.execute(SCHEMA)
    conn.execute(_INDEX)
    if "outcome" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
        conn.execute("ALTER TABLE events ADD COLUMN outcome TEXT")
    conn.execute(_PENDING_INDEX)


def insert(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    """Append `events`; runs in the transaction of the change they describe."""
    conn.executemany(
        "INSERT OR IGNORE INTO events (id, tenant, created_at, body) VALUES (?, ?, ?, ?)",
        [(event.id, event.tenant, event.timestamp, event.dumps()) for event in events],
    )


def after(
    conn: sqlite3.Connection, cursor: str | None, limit: int, tenant: str | None
) -> tuple[list[Event], str | None]:
    """Up to `limit` events after `cursor` (None: the oldest kept), of `tenant` if given,
    oldest first, and the cursor after the last of them."""
    start = parse_cursor(cursor)
    query = "SELECT seq, body FROM events WHERE seq > ?"
    params: list[object] = [start]
    if tenant is not None:
        query += " AND tenant = ?"
        params.append(tenant)
    query += " ORDER BY seq LIMIT ?"
    params.append(limit)
    try:
        rows = conn.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        rows = []  # a read-only store made before events: there are none
    if not rows:
        return [], cursor
    return [Event.loads(str(body)) for _, body in rows], str(rows[-1][0])


def prune(conn: sqlite3.Connection, before: datetime) -> int:
    """Delete the events older than `before`; how many."""
    deleted = conn.execute("DELETE FROM events WHERE created_at < ?", (stamp(before),)).rowcount
    return int(deleted)


def claim(
    conn: sqlite3.Connection, holder: str, now: datetime, until: datetime, limit: int
) -> list[Delivery]:
    """Lease the due events to `holder` until `until`; runs in a write transaction."""
    rows = conn.execute(_DUE, (stamp(now), limit)).fetchall()
    conn.executemany(
        "UPDATE events SET claimed_by = ?, claimed_until = ? WHERE seq = ?",
        [(holder, stamp(until), seq) for seq, _, _ in rows],
    )
    return [Delivery(Event.loads(str(body)), int(attempts)) for _, body, attempts in rows]


def settle(
    conn: sqlite3.Connection, holder: str, settled: Sequence[Settlement], now: datetime
) -> list[str]:
    """Record `holder`'s outcomes (only for events it still holds); in a write transaction.
    The ids of the events recorded."""
    applied: list[str] = []
    for item in settled:
        if item.result == "retried":
            if item.retry_at is None:
                raise ValueError(f"event {item.event_id}: a retry without a time to retry at")
            cursor = conn.execute(
                "UPDATE events SET attempts = attempts + 1, claimed_by = NULL,"
                " claimed_until = ? WHERE id = ? AND claimed_by = ? AND delivered_at IS NULL",
                (stamp(item.retry_at), item.event_id, holder),
            )
        else:
            cursor = conn.execute(
                "UPDATE events SET attempts = attempts + 1, claimed_by = NULL,"
                " claimed_until = NULL, delivered_at = ?, outcome = ?"
                " WHERE id = ? AND claimed_by = ? AND delivered_at IS NULL",
                (stamp(now), item.result, item.event_id, holder),
            )
        if cursor.rowcount:
            applied.append(item.event_id)
    return applied


def release(conn: sqlite3.Connection, holder: str) -> None:
    """Make the events `holder` claimed and did not settle due again; in a write transaction."""
    conn.execute(
        "UPDATE events SET claimed_by = NULL, claimed_until = NULL"
        " WHERE claimed_by = ? AND delivered_at IS NULL",
        (holder,),
    )


def pending(conn: sqlite3.Connection) -> int:
    """How many events are neither delivered nor given up."""
    try:
        row = conn.execute("SELECT count(*) FROM events WHERE delivered_at IS NULL").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return 0
    return int(row[0])


SQLITE_MAX_INTEGER = 2**63 - 1


def parse_cursor(cursor: str | None) -> int:
    """The sequence number a feed cursor names (ValueError: not one of ours)."""
    if cursor is None:
        return 0
    # ASCII digits only ("²" is a digit to str.isdigit) and within SQLite's integers.
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > SQLITE_MAX_INTEGER:
        raise ValueError("not a cursor of this store")
    return int(cursor)
