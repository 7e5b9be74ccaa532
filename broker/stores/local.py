"""The embedded store (`BROKER_STORE=local`): SQLite in the store directory, keys sealed.

Files: `<path>/tenants.db` (with its `-wal` and `-shm` files) and, unless a master key is
given, `<path>/master.key`. Metadata lives in clear columns; a key only ever as an
AES-256-GCM ciphertext bound to its tenant, so no key byte is on disk in clear.

Several processes may share one database: every write is a single compare-and-set statement
(`INSERT` that fails on an existing row, `UPDATE … WHERE version = ?`) and SQLite's locks
order them (WAL, busy_timeout). Replaced and deleted ciphertexts are overwritten in place
(`secure_delete`), and the WAL is checkpointed and truncated after each write, so old key
material does not linger in either file.

A database that can be read but not written (a read-only file system or mount, a file the
broker's user may only read) is opened read-only: the store serves every record, answers every
write with `StoreUnavailable`, and says why in `read_only` (the broker reports it on /readyz).
A read-only WAL database whose `-shm` file cannot be created (the usual case after a clean
shutdown) is opened `immutable`: SQLite then assumes no one changes the file meanwhile.

Each put and delete appends `(revision, tenant)` to the `changes` table in the same
transaction as the write, and prunes it to the newest `journal_size` entries. Cursors name
the database by a random id stored in it when it is created, so a cursor from another file,
or from a database that was deleted and created again, means "reload everything".
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState, valid_tenant_id
from broker.settings import ConfigError
from broker.stores import report_unreadable
from broker.stores.crypto import (
    KEY_FILE_NAME,
    Sealer,
    UnsealError,
    load_or_create_master_key,
    tenant_context,
)
from broker.stores.journal import NO_INSTANCE, Cursor, readable_from, tenants_of

T = TypeVar("T")

DB_FILE_NAME = "tenants.db"
JOURNAL_SIZE = 10_000

_KEY_CHECK_PLAINTEXT = b"pleo-key-broker master key check"
_KEY_CHECK_CONTEXT = b"pleo-key-broker/key-check/v1"

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
    application_name TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant   TEXT NOT NULL
);
"""

# Columns added after the first release: a store made before them gets them at open
# (`ALTER TABLE … ADD COLUMN`, NULL in existing rows, which read as "not known").
_ADDED_COLUMNS = (("client_id", "TEXT"), ("application_name", "TEXT"))

_INSERT = (
    "INSERT INTO tenants (tenant, version, state, company_id, scopes, missing_scopes, reason,"
    " message, activated_at, updated_at, last_checked_at, sealed_key, client_id,"
    " application_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_FIRST_COLUMNS = (
    "tenant, version, state, company_id, scopes, missing_scopes, reason, message,"
    " activated_at, updated_at, last_checked_at, sealed_key"
)


def _selects(present: set[str]) -> tuple[str, str]:
    """The queries reading one record and all of them; NULL for a column the file lacks
    (a store made before it, opened read-only, so it cannot be added)."""
    added = ", ".join(name if name in present else f"NULL AS {name}" for name, _ in _ADDED_COLUMNS)
    columns = f"{_FIRST_COLUMNS}, {added}"
    return (
        f"SELECT {columns} FROM tenants WHERE tenant = ?",  # noqa: S608 - constant columns
        f"SELECT {columns} FROM tenants ORDER BY tenant",  # noqa: S608
    )


_SELECT_ONE, _SELECT_ALL = _selects({name for name, _ in _ADDED_COLUMNS})
_UPDATE = (
    "UPDATE tenants SET version = ?, state = ?, company_id = ?, scopes = ?, missing_scopes = ?,"
    " reason = ?, message = ?, activated_at = ?, updated_at = ?, last_checked_at = ?,"
    " sealed_key = ?, client_id = ?, application_name = ? WHERE tenant = ? AND version = ?"
)


class LocalStore:
    """Tenant records in an SQLite file, keys encrypted with AES-256-GCM."""

    backend = "local"

    def __init__(
        self,
        path: Path,
        master_key: bytes | None = None,
        *,
        busy_timeout: float = 5.0,
        journal_size: int = JOURNAL_SIZE,
    ) -> None:
        if journal_size < 1:
            raise ValueError("the journal keeps at least one entry")
        self.path = Path(path)
        self.db_path = self.path / DB_FILE_NAME
        self._busy_timeout = busy_timeout
        self._journal_size = journal_size
        self._instance = ""
        self._closed = False
        self.read_only: str | None = None
        self._select_one, self._select_all = _SELECT_ONE, _SELECT_ALL
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"Cannot create the store directory {self.path}: {exc}") from exc
        self._sealer = Sealer(master_key if master_key is not None else self._key_from_file())
        # sqlite3 calls block, so none runs on the event loop. One dedicated thread owns the one
        # connection: a connection must not be used from two threads at once, keeping it open
        # spares re-opening and re-running the pragmas per call, and this process's writes are
        # serialised before they reach SQLite, so the busy timeout only has to cover other
        # processes sharing the file.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-local-store")
        try:
            self._conn = self._executor.submit(self._connect).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None."""
        return await self._run(lambda conn: self._get(conn, tenant))

    async def list(self) -> builtins.list[TenantRecord]:
        """Every tenant's record, ordered by tenant id."""
        return await self._run(self._list)

    async def put(self, record: TenantRecord) -> TenantRecord:
        """Compare-and-set write; returns the stored record with its new version."""
        if not valid_tenant_id(record.tenant):
            raise ValueError("not a valid tenant id")
        if record.version < 0:
            raise ValueError("a record version is never negative")
        self._refuse_if_read_only()
        return await self._run(lambda conn: self._put(conn, record))

    async def delete(self, tenant: str) -> bool:
        """Delete the tenant and overwrite its key material; False if there was none."""
        self._refuse_if_read_only()
        return await self._run(lambda conn: self._delete(conn, tenant))

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        return await self._run(lambda conn: self._changes_since(conn, cursor))

    async def close(self) -> None:
        """Close the connection and stop the worker thread; later calls fail."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            # The close job has run, so the worker is idle and exits at once.
            self._executor.shutdown(wait=True)

    def _refuse_if_read_only(self) -> None:
        if self.read_only is not None:
            raise StoreUnavailable(
                f"The local store is read-only: {self.read_only}. Tenants are served as"
                " stored, but none can be connected, changed or disconnected until the store"
                " directory is writable and the broker restarted."
            )

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        # Cancelling the caller does not stop a job the worker has begun: a write either
        # commits or not, as a whole, and the next read tells which.
        if self._closed:
            raise StoreUnavailable("The local store is closed.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, operation)

    def _guarded(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return operation(self._conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"The local store {self.db_path} failed ({type(exc).__name__}: {exc})."
            ) from exc

    def _key_from_file(self) -> bytes:
        key_file = self.path / KEY_FILE_NAME
        if not key_file.exists() and self.db_path.exists() and self.db_path.stat().st_size > 0:
            raise ConfigError(
                f"master key file {key_file} is missing but {self.db_path} exists;"
                " restore the key file or set BROKER_MASTER_KEY to the key the store was made with"
            )
        try:
            return load_or_create_master_key(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot read or create master key file {key_file}: {exc}") from exc

    # Everything below runs on the worker thread.

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._connect_writable()
        except (OSError, sqlite3.Error) as exc:
            unwritable = exc
        if not (_is_read_only_error(unwritable) and self.db_path.is_file()):
            raise StoreUnavailable(
                f"Cannot open the local store {self.db_path}: {unwritable}"
            ) from unwritable
        try:
            conn = self._connect_read_only()
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(
                f"Cannot open the local store {self.db_path}: {unwritable}; nor read-only: {exc}"
            ) from exc
        self.read_only = f"{self.db_path} cannot be written ({_describe(unwritable)})"
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        failure: sqlite3.Error | None = None
        # A WAL database is read through its -shm file: first use the one a running (or
        # crashed) writer left; without one, and no right to create it, read it as immutable.
        for query in ("mode=ro", "mode=ro&immutable=1"):
            uri = f"{self.db_path.absolute().as_uri()}?{query}"
            conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute("SELECT count(*) FROM tenants").fetchone()
                present = {row[1] for row in conn.execute("PRAGMA table_info(tenants)")}
                self._select_one, self._select_all = _selects(present)
                self._check_master_key(conn, writable=False)
                self._instance = self._instance_id(conn, writable=False)
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

    def _connect_writable(self) -> sqlite3.Connection:
        # Create the file private before SQLite does (its -wal and -shm files copy the mode).
        os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout, isolation_level=None)
        try:
            mode = self._when_unlocked(
                lambda: str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            )
            if mode != "wal":
                raise StoreUnavailable(f"{self.db_path} cannot use WAL mode (got {mode!r}).")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            # One write transaction taken up front (BEGIN IMMEDIATE waits for the lock):
            # processes opening a new store together would otherwise each start reading and
            # then fail to upgrade to a write, which SQLite answers with an immediate "locked".
            with self._transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _add_missing_columns(conn)
                self._check_master_key(conn)
                self._instance = self._instance_id(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _when_unlocked(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`, retrying "database is locked" until the busy timeout has passed.

        Switching to WAL takes an exclusive lock that SQLite's busy handler does not always
        wait for when several connections open a new file at the same moment.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _check_master_key(self, conn: sqlite3.Connection, *, writable: bool = True) -> None:
        """Refuse at start-up, not at the first read, a master key the store was not made with."""
        if writable:
            check = self._sealer.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_CONTEXT)
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('key_check', ?)", (check,)
            )
        row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
        if row is None:
            return  # read-only and never written: no record to open either
        try:
            self._sealer.open(bytes(row[0]), _KEY_CHECK_CONTEXT)
        except (UnsealError, TypeError) as exc:
            raise StoreIntegrityError(
                f"The master key does not open {self.db_path}: wrong master key or tampered"
                " record. Use the key this store was created with (BROKER_MASTER_KEY or"
                f" {self.path / KEY_FILE_NAME})."
            ) from exc

    def _instance_id(self, conn: sqlite3.Connection, *, writable: bool = True) -> str:
        """The random id of this database, made when the database is."""
        if writable:
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('instance', ?)",
                (secrets.token_hex(8),),
            )
        row = conn.execute("SELECT value FROM meta WHERE name = 'instance'").fetchone()
        return NO_INSTANCE if row is None else str(row[0])

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _journal(self, conn: sqlite3.Connection, tenant: str) -> None:
        """Record a change of `tenant`; runs in the write's transaction."""
        revision = conn.execute("INSERT INTO changes (tenant) VALUES (?)", (tenant,)).lastrowid
        assert revision is not None
        conn.execute("DELETE FROM changes WHERE revision <= ?", (revision - self._journal_size,))

    def _changes_since(
        self, conn: sqlite3.Connection, cursor: str | None
    ) -> tuple[str, builtins.list[str] | None]:
        # One read transaction: a write pruning the journal between reading its bounds and
        # its entries would otherwise hide changes.
        conn.execute("BEGIN")
        try:
            oldest, newest = conn.execute(
                "SELECT min(revision), max(revision) FROM changes"
            ).fetchone()
            current = Cursor(self.backend, self._instance, int(newest or 0))
            after = readable_from(cursor, current, int(oldest or current.revision + 1))
            if after is None:
                return str(current), None
            rows = conn.execute(
                "SELECT revision, tenant FROM changes WHERE revision > ? ORDER BY revision",
                (after,),
            ).fetchall()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        return str(current), tenants_of(rows, after)

    def _get(self, conn: sqlite3.Connection, tenant: str) -> TenantRecord | None:
        row = conn.execute(self._select_one, (tenant,)).fetchone()
        return self._record(row) if row is not None else None

    def _list(self, conn: sqlite3.Connection) -> builtins.list[TenantRecord]:
        records = []
        for row in conn.execute(self._select_all).fetchall():
            try:
                records.append(self._record(row))
            except StoreIntegrityError as exc:
                report_unreadable(self.backend, str(row[0]), exc)
        return records

    def _put(self, conn: sqlite3.Connection, record: TenantRecord) -> TenantRecord:
        sealed = (
            self._sealer.seal(record.api_key.reveal().encode(), tenant_context(record.tenant))
            if record.api_key is not None
            else None
        )
        fields = (
            record.state.value,
            record.company_id,
            json.dumps(sorted(record.scopes)),
            json.dumps(list(record.missing_scopes)),
            record.reason.value if record.reason is not None else None,
            record.message,
            _timestamp(record.activated_at),
            record.updated_at.isoformat(),
            _timestamp(record.last_checked_at),
            sealed,
            record.client_id,
            record.application_name,
        )
        new_version = record.version + 1
        with self._transaction(conn):
            if record.version == 0:
                try:
                    conn.execute(_INSERT, (record.tenant, new_version, *fields))
                except sqlite3.IntegrityError as exc:
                    raise StoreConflict(
                        f"Tenant {record.tenant!r} already exists; read it again and retry.",
                        tenant=record.tenant,
                    ) from exc
            else:
                cursor = conn.execute(
                    _UPDATE, (new_version, *fields, record.tenant, record.version)
                )
                if cursor.rowcount != 1:
                    raise StoreConflict(
                        f"Tenant {record.tenant!r} changed or was removed since version"
                        f" {record.version} was read; read it again and retry.",
                        tenant=record.tenant,
                    )
            self._journal(conn, record.tenant)
        self._purge_wal(conn)
        return record.evolve(version=new_version)

    def _delete(self, conn: sqlite3.Connection, tenant: str) -> bool:
        with self._transaction(conn):
            deleted = conn.execute("DELETE FROM tenants WHERE tenant = ?", (tenant,)).rowcount == 1
            if deleted:
                self._journal(conn, tenant)
        if deleted:
            self._purge_wal(conn)
        return deleted

    def _purge_wal(self, conn: sqlite3.Connection) -> None:
        # Old page images (with the previous ciphertext) stay in the WAL until it is reset.
        # If another process is reading, the truncation waits for a later write; that is
        # acceptable because what lingers is ciphertext, never a key in clear.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _record(self, row: tuple[Any, ...]) -> TenantRecord:
        (
            tenant,
            version,
            state,
            company_id,
            scopes,
            missing_scopes,
            reason,
            message,
            activated_at,
            updated_at,
            last_checked_at,
            sealed,
            client_id,
            application_name,
        ) = row
        api_key = self._unseal_key(tenant, sealed) if sealed is not None else None
        try:
            return TenantRecord(
                tenant=tenant,
                version=int(version),
                state=TenantState(state),
                api_key=api_key,
                company_id=company_id,
                scopes=frozenset(json.loads(scopes)),
                missing_scopes=tuple(json.loads(missing_scopes)),
                reason=BrokenReason(reason) if reason is not None else None,
                message=message,
                activated_at=_parse_timestamp(activated_at),
                updated_at=datetime.fromisoformat(updated_at),
                last_checked_at=_parse_timestamp(last_checked_at),
                client_id=client_id,
                application_name=application_name,
            )
        except (ValueError, TypeError) as exc:
            raise _unreadable(tenant) from exc

    def _unseal_key(self, tenant: str, sealed: bytes) -> ApiKey:
        try:
            plaintext = self._sealer.open(bytes(sealed), tenant_context(tenant))
        except UnsealError as exc:
            raise _unreadable(tenant) from exc
        try:
            return ApiKey(plaintext.decode())
        except UnicodeDecodeError:
            # Not chained: the decode error would carry the decrypted bytes.
            raise _unreadable(tenant) from None


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    present = {row[1] for row in conn.execute("PRAGMA table_info(tenants)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE tenants ADD COLUMN {name} {kind}")


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


def _unreadable(tenant: str) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"The stored record of tenant {tenant!r} cannot be read: wrong master key or tampered"
        " record. Restore the right master key, or disconnect and reconnect the tenant.",
        tenant=tenant,
    )


def _timestamp(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _parse_timestamp(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None
