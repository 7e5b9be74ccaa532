"""The local store's connect sessions: table `connect_sessions`, one JSON document a session.

Writes are compare-and-set on `version`, as the tenants' are. Every function is blocking and
runs on the store's worker thread.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

from broker.connect_sessions import ConnectSession
from broker.errors import StoreConflict
from broker.stores.sqlite import transaction


def put(conn: sqlite3.Connection, session: ConnectSession) -> ConnectSession:
    """Store `session` if the stored version is still `session.version` (0: none)."""
    data = json.dumps(session.to_data())
    version = session.version + 1
    with transaction(conn):
        if session.version == 0:
            written = conn.execute(
                "INSERT OR IGNORE INTO connect_sessions (token_hash, version, data)"
                " VALUES (?, ?, ?)",
                (session.token_hash, version, data),
            ).rowcount
        else:
            written = conn.execute(
                "UPDATE connect_sessions SET version = ?, data = ?"
                " WHERE token_hash = ? AND version = ?",
                (version, data, session.token_hash, session.version),
            ).rowcount
    if written != 1:
        raise StoreConflict(tenant=session.tenant)
    return replace(session, version=version)


def get(conn: sqlite3.Connection, token_hash: str) -> ConnectSession | None:
    """The session stored under `token_hash`, or None."""
    row = conn.execute(
        "SELECT version, data FROM connect_sessions WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return None if row is None else ConnectSession.from_data(json.loads(row[1]), row[0])


def all_sessions(conn: sqlite3.Connection) -> list[ConnectSession]:
    """Every stored session."""
    rows = conn.execute("SELECT version, data FROM connect_sessions").fetchall()
    return [ConnectSession.from_data(json.loads(data), version) for version, data in rows]


def delete(conn: sqlite3.Connection, token_hash: str) -> bool:
    """Delete the session; False if there was none."""
    with transaction(conn):
        deleted = conn.execute(
            "DELETE FROM connect_sessions WHERE token_hash = ?", (token_hash,)
        ).rowcount
    return bool(deleted == 1)
