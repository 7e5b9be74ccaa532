"""SQLite plumbing of the local store: opening the file, its schema, transactions, the journal.

A database that can be written is opened in WAL mode with `synchronous = FULL` and
`secure_delete = ON` (a replaced or deleted ciphertext is overwritten in place), and its
schema is created or extended in one write transaction. One that can be read but not written
(a read-only file system or mount, a file the broker's user may only read) is opened
read-only; a read-only WAL database whose `-shm` file cannot be created (the usual case after
a clean shutdown) is opened `immutable`: SQLite then assumes no one changes the file meanwhile.

Every function here is blocking and runs on the store's one worker thread.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from broker.errors import StoreUnavailable
from broker.stores.codec import LIST_FIELDS, Field, Fields

T = TypeVar("T")

# Prepares a freshly opened connection (checks the master key, reads the database's id);
# its argument says whether the connection may write.
Prepare = Callable[[sqlite3.Connection, bool], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant          TEXT PRIMARY KEY NOT NULL,
    version         INTEGER NOT NULL,
    state           TEXT NOT NULL,
    company_id      TEXT,
    scopes          TEXT NOT NULL,
    missing_scopes  TEXT NOT NULL,
    reason          TEXT,
    message         TEXT,
    activated_at    TEXT,
    updated_at      TEXT NOT NULL,
    last_checked_at TEXT,
    sealed_key      BLOB,
    client_id       TEXT,
    application_name TEXT,
    installation_status TEXT,
    installation_synced_at TEXT,
    installation_error TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS connect_sessions (
    token_hash TEXT PRIMARY KEY NOT NULL,
    version    INTEGER NOT NULL,
    data       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant   TEXT NOT NULL
);
"""

# Columns added after the first release: a store made before them gets them at open
# (`ALTER TABLE … ADD COLUMN`, NULL in existing rows, which read as "not known").
_ADDED_COLUMNS = (
    ("client_id", "TEXT"),
    ("application_name", "TEXT"),
    ("installation_status", "TEXT"),
    ("installation_synced_at", "TEXT"),
    ("installation_error", "TEXT"),
)
_FIRST_COLUMNS = (
    "tenant",
    "version",
    "state",
    "company_id",
    "scopes",
    "missing_scopes",
    "reason",
    "message",
    "activated_at",
    "updated_at",
    "last_checked_at",
    "sealed_key",
)
COLUMNS = (*_FIRST_COLUMNS, *(name for name, _ in _ADDED_COLUMNS))
Row = dict[str, object]

_INSERT = (
    f"INSERT INTO tenants ({', '.join(COLUMNS)})"  # noqa: S608 - constant columns
    f" VALUES ({', '.join(':' + name for name in COLUMNS)})"
)
_UPDATE = (
    "UPDATE tenants SET "  # noqa: S608 - constant columns
    + ", ".join(f"{name} = :{name}" for name in COLUMNS if name != "tenant")
    + " WHERE tenant = :tenant AND version = :expected"
)


def open_database(
    path: Path, busy_timeout: float, prepare: Prepare
) -> tuple[sqlite3.Connection, str | None]:
    """A connection to `path` and None, or a read-only one and why it cannot be written."""
    try:
        return _connect_writable(path, busy_timeout, prepare), None
    except (OSError, sqlite3.Error) as exc:
        unwritable = exc
    if not (_is_read_only_error(unwritable) and path.is_file()):
        raise StoreUnavailable(f"Cannot open the local store {path}: {unwritable}") from unwritable
    try:
        conn = _connect_read_only(path, busy_timeout, prepare)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(
            f"Cannot open the local store {path}: {unwritable}; nor read-only: {exc}"
        ) from exc
    return conn, f"{path} cannot be written ({_describe(unwritable)})"


def _connect_read_only(path: Path, busy_timeout: float, prepare: Prepare) -> sqlite3.Connection:
    failure: sqlite3.Error | None = None
    # A WAL database is read through its -shm file: first use the one a running (or
    # crashed) writer left; without one, and no right to create it, read it as immutable.
    for query in ("mode=ro", "mode=ro&immutable=1"):
        if "immutable" in query and _has_unmerged_log(path):
            # Immutable reads ignore the log: changes committed there (a disconnect, say)
            # would be undone, and a destroyed key served again.
            raise StoreUnavailable(
                f"The read-only store {path} has changes in its write-ahead log"
                f" ({path.name}-wal) that only a writable store can read; start the broker"
                " once where the store directory can be written, then make it read-only."
            ) from failure
        uri = f"{path.absolute().as_uri()}?{query}"
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM tenants").fetchone()
            prepare(conn, False)
        except sqlite3.Error as exc:
            conn.close()
            failure = exc
            continue
        except BaseException:
            conn.close()
            raise
        return conn
    assert failure is not None
    raise failure


def _has_unmerged_log(path: Path) -> bool:
    try:
        return path.with_name(path.name + "-wal").stat().st_size > 0
    except FileNotFoundError:
        return False


def _connect_writable(path: Path, busy_timeout: float, prepare: Prepare) -> sqlite3.Connection:
    # Create the file private before SQLite does (its -wal and -shm files copy the mode).
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        mode = when_unlocked(
            lambda: str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]), busy_timeout
        )
        if mode != "wal":
            raise StoreUnavailable(f"{path} cannot use WAL mode (got {mode!r}).")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")
        # One write transaction taken up front (BEGIN IMMEDIATE waits for the lock):
        # processes opening a new store together would otherwise each start reading and
        # then fail to upgrade to a write, which SQLite answers with an immediate "locked".
        with transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            _add_missing_columns(conn)
            prepare(conn, True)
    except BaseException:
        conn.close()
        raise
    return conn


def when_unlocked(attempt: Callable[[], T], busy_timeout: float) -> T:
    """Run `attempt`, retrying "database is locked" until the busy timeout has passed.

    Switching to WAL takes an exclusive lock that SQLite's busy handler does not always
    wait for when several connections open a new file at the same moment.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: BEGIN IMMEDIATE, COMMIT, or ROLLBACK on any failure."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def has_tenants(conn: sqlite3.Connection) -> bool:
    """True if the `tenants` table has a row."""
    return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM tenants)").fetchone()[0])


def meta_value(conn: sqlite3.Connection, name: str, first: object | None) -> object | None:
    """The `meta` value `name`, set to `first` if it has none (None: only read it)."""
    if first is not None:
        conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, first))
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    present = columns_of(conn)
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE tenants ADD COLUMN {name} {kind}")


def columns_of(conn: sqlite3.Connection) -> set[str]:
    """The columns the `tenants` table has."""
    return {row[1] for row in conn.execute("PRAGMA table_info(tenants)")}


def selects(present: set[str]) -> tuple[str, str]:
    """The queries reading one row and all of them; NULL for a column the file lacks
    (a store made before it, opened read-only, so it cannot be added)."""
    added = ", ".join(name if name in present else f"NULL AS {name}" for name, _ in _ADDED_COLUMNS)
    columns = f"{', '.join(_FIRST_COLUMNS)}, {added}"
    return (
        f"SELECT {columns} FROM tenants WHERE tenant = ?",  # noqa: S608 - constant columns
        f"SELECT {columns} FROM tenants ORDER BY tenant",  # noqa: S608
    )


def row_of(values: tuple[object, ...]) -> Row:
    """A selected row by column name."""
    return dict(zip(COLUMNS, values, strict=True))


def fields_of(row: Row) -> dict[str, object]:
    """A row's record fields as the codec reads them (list columns are JSON)."""
    return {
        name: json.loads(str(value)) if name in LIST_FIELDS and value is not None else value
        for name, value in row.items()
    }


def columns_for(fields: Fields, *, version: int, sealed_key: bytes | None) -> Row:
    """The row that stores `fields` (as the codec made them) at `version`."""
    row: Row = {name: _column(value) for name, value in fields.items()}
    return {**row, "version": version, "sealed_key": sealed_key}


def _column(value: Field) -> object:
    return json.dumps(value) if isinstance(value, list) else value


def insert(conn: sqlite3.Connection, row: Row) -> bool:
    """Insert a new tenant's row; False if the tenant exists."""
    try:
        conn.execute(_INSERT, row)
    except sqlite3.IntegrityError:
        return False
    return True


def update(conn: sqlite3.Connection, row: Row, *, expected: int) -> bool:
    """Replace the tenant's row if it is still at version `expected`."""
    return conn.execute(_UPDATE, {**row, "expected": expected}).rowcount == 1


def delete(conn: sqlite3.Connection, tenant: str) -> bool:
    """Delete the tenant's row; False if there was none."""
    return conn.execute("DELETE FROM tenants WHERE tenant = ?", (tenant,)).rowcount == 1


def journal(conn: sqlite3.Connection, tenant: str, *, keep: int) -> None:
    """Record a change of `tenant` and keep the newest `keep`; runs in the write's transaction."""
    revision = conn.execute("INSERT INTO changes (tenant) VALUES (?)", (tenant,)).lastrowid
    assert revision is not None
    conn.execute("DELETE FROM changes WHERE revision <= ?", (revision - keep,))


def journal_bounds(conn: sqlite3.Connection) -> tuple[int | None, int | None]:
    """The oldest and newest revision the journal holds (None, None: it holds none)."""
    oldest, newest = conn.execute("SELECT min(revision), max(revision) FROM changes").fetchone()
    return oldest, newest


def journal_after(conn: sqlite3.Connection, revision: int) -> list[tuple[int, str]]:
    """The journal's entries after `revision`, oldest first."""
    return conn.execute(
        "SELECT revision, tenant FROM changes WHERE revision > ? ORDER BY revision", (revision,)
    ).fetchall()


@contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One consistent snapshot for several reads."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def purge_wal(conn: sqlite3.Connection) -> None:
    """Reset the WAL, so old page images (previous ciphertexts) do not linger in it.

    If another process is reading, the truncation waits for a later write; that is
    acceptable because what lingers is ciphertext, never a key in clear.
    """
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _is_read_only_error(exc: OSError | sqlite3.Error) -> bool:
    """True if `exc` says the database (or its directory) may be read but not written."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    text = str(exc).lower()
    return any(
        sign in text for sign in ("readonly database", "read-only", "unable to open database file")
    )


def _describe(exc: OSError | sqlite3.Error) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
