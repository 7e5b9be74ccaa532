"""The embedded store (`BROKER_STORE=local`): SQLite in the store directory, keys sealed.

Files: `<path>/tenants.db` (with its `-wal` and `-shm` files) and, unless a master key is
given, `<path>/master.key`. Metadata lives in clear columns; a key only ever as an
AES-256-GCM ciphertext bound to its tenant, so no key byte is on disk in clear.

Several processes may share one database: every write is a single compare-and-set statement
(`INSERT` that fails on an existing row, `UPDATE … WHERE version = ?`) and SQLite's locks
order them (WAL, busy_timeout). Replaced and deleted ciphertexts are overwritten in place
(`secure_delete`), and the WAL is checkpointed and truncated after each write, so old key
material does not linger in either file. How the file is opened: `broker.stores.sqlite`.

A database that can be read but not written is opened read-only: the store serves every
record, answers every write with `StoreUnavailable`, and says why in `read_only` (the broker
reports it on /readyz).

Each put and delete appends `(revision, tenant)` to the `changes` table in the same
transaction as the write, and prunes it to the newest `journal_size` entries. Cursors name
the database by a random id stored in it when it is created, so a cursor from another file,
or from a database that was deleted and created again, means "reload everything".
"""

from __future__ import annotations

import builtins
import hmac
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from broker.connect_sessions import ConnectSession
from broker.delivery import Delivery, Settlement
from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.outbox import Event
from broker.records import ApiKey, TenantRecord, valid_tenant_id
from broker.settings import ConfigError
from broker.stores import codec, report_unreadable, sqlite, sqlite_events, sqlite_sessions
from broker.stores.crypto import (
    KEY_FILE_NAME,
    Sealer,
    UnsealError,
    load_or_create_master_key,
    tenant_context,
)
from broker.stores.journal import NO_INSTANCE, Cursor, readable_from, tenants_of
from broker.stores.runner import BlockingRunner

T = TypeVar("T")

DB_FILE_NAME = "tenants.db"
JOURNAL_SIZE = 10_000

_KEY_CHECK_PLAINTEXT = b"pleo-key-broker master key check"
_KEY_CHECK_CONTEXT = b"pleo-key-broker/key-check/v1"
_FINGERPRINT = "key_fingerprint"  # the `meta` row of the master key's fingerprint


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
        self._key_checked = False  # the master key opened the store's key check
        self.read_only: str | None = None
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
        self._runner = BlockingRunner("broker-local-store", translate=self._translate)
        try:
            self._conn = self._runner.call_now(self._connect)
        except BaseException:
            self._runner.shutdown()
            raise

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None."""
        return await self._run(lambda conn: self._get(conn, tenant))

    async def list(self) -> builtins.list[TenantRecord]:
        """Every tenant's record, ordered by tenant id."""
        return await self._run(self._list)

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        """Compare-and-set write with its events, in one transaction; the stored record."""
        if not valid_tenant_id(record.tenant):
            raise ValueError("not a valid tenant id")
        if record.version < 0:
            raise ValueError("a record version is never negative")
        self._refuse_if_read_only()
        return await self._run(lambda conn: self._put(conn, record, events))

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        """Delete the tenant and overwrite its key material, and write `events` with it (in
        one transaction); False if there was none."""
        self._refuse_if_read_only()
        return await self._run(lambda conn: self._delete(conn, tenant, events))

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        """Up to `limit` events after `cursor`, oldest first, and the cursor to go on from."""
        return await self._run(lambda conn: sqlite_events.after(conn, cursor, limit, tenant))

    async def prune_events(self, before: datetime) -> int:
        """Forget the events older than `before`; how many."""
        self._refuse_if_read_only()
        return await self._run(lambda conn: sqlite_events.prune(conn, before))

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        """Lease each tenant's oldest due event to `holder` (one transaction)."""
        self._refuse_if_read_only()

        def claim(conn: sqlite3.Connection) -> builtins.list[Delivery]:
            with sqlite.transaction(conn):
                return sqlite_events.claim(conn, holder, now, now + lease, limit)

        return await self._run(claim)

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        """Record how `holder`'s attempts ended (one transaction); the ids recorded."""
        self._refuse_if_read_only()

        def settle(conn: sqlite3.Connection) -> builtins.list[str]:
            with sqlite.transaction(conn):
                return sqlite_events.settle(conn, holder, settled, now)

        return await self._run(settle)

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        """Make `holder`'s claimed, unsettled events due again (one transaction)."""
        self._refuse_if_read_only()

        def release(conn: sqlite3.Connection) -> None:
            with sqlite.transaction(conn):
                sqlite_events.release(conn, holder)

        await self._run(release)

    async def pending_deliveries(self) -> int:
        """How many events are neither delivered nor given up."""
        return await self._run(sqlite_events.pending)

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        return await self._run(lambda conn: self._changes_since(conn, cursor))

    async def put_session(self, session: ConnectSession) -> ConnectSession:
        """Compare-and-set write of a connect session (table `connect_sessions`)."""
        self._refuse_if_read_only()
        return await self._run(lambda conn: sqlite_sessions.put(conn, session))

    async def get_session(self, token_hash: str) -> ConnectSession | None:
        """The connect session of this token hash, or None."""
        return await self._run(lambda conn: sqlite_sessions.get(conn, token_hash))

    async def list_sessions(self) -> builtins.list[ConnectSession]:
        """Every stored connect session."""
        return await self._run(sqlite_sessions.all_sessions)

    async def delete_session(self, token_hash: str) -> bool:
        """Forget a connect session; False if there was none."""
        self._refuse_if_read_only()
        return await self._run(lambda conn: sqlite_sessions.delete(conn, token_hash))

    async def close(self) -> None:
        """Close the connection and stop the worker thread; later calls fail."""
        if self._closed:
            return
        self._closed = True
        await self._runner.close(self._conn.close)

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
        return await self._runner.run(lambda: operation(self._conn))

    def _translate(self, exc: Exception) -> Exception | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        return StoreUnavailable(
            f"The local store {self.db_path} failed ({type(exc).__name__}: {exc})."
        )

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
        conn, self.read_only = sqlite.open_database(self.db_path, self._busy_timeout, self._prepare)
        self._select_one, self._select_all = sqlite.selects(sqlite.columns_of(conn))
        return conn

    def _prepare(self, conn: sqlite3.Connection, writable: bool) -> None:
        self._check_fingerprint(conn, writable=writable)
        if sqlite.has_tenants(conn):
            self._check_master_key(conn, writable=writable)
        if writable:
            sqlite_events.create(conn)
        instance = sqlite.meta_value(conn, "instance", secrets.token_hex(8) if writable else None)
        self._instance = NO_INSTANCE if instance is None else str(instance)

    def _check_fingerprint(self, conn: sqlite3.Connection, *, writable: bool) -> None:
        """Refuse, at open, a master key other than the one the store sealed its key check
        with, whatever the store holds, by the key's fingerprint (no cipher needed). A store
        made before fingerprints has none: its key check is opened instead, once (the
        cipher loaded for it), and the fingerprint written."""
        stored = sqlite.meta_value(conn, _FINGERPRINT, None)
        if stored is None:
            if sqlite.meta_value(conn, "key_check", None) is not None:
                self._check_master_key(conn, writable=writable)
            return  # else nothing was ever sealed: the first key sealed binds the store
        if not isinstance(stored, str) or not hmac.compare_digest(
            stored.encode("utf-8", "replace"), self._sealer.fingerprint().encode("ascii")
        ):
            raise self._wrong_key()

    def _wrong_key(self) -> StoreIntegrityError:
        return StoreIntegrityError(
            f"The master key does not open {self.db_path}: wrong master key or tampered"
            " record. Use the key this store was created with (BROKER_MASTER_KEY or"
            f" {self.path / KEY_FILE_NAME})."
        )

    def _check_master_key(self, conn: sqlite3.Connection, *, writable: bool) -> None:
        """Refuse a master key the store was not made with: at start-up when the store holds
        records, else before the first key is sealed or opened (the cipher is loaded then,
        not at start: docs/decisions.md, "What `broker serve` imports when")."""
        if self._key_checked:
            return
        first = self._sealer.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_CONTEXT) if writable else None
        check = sqlite.meta_value(conn, "key_check", first)
        if check is None:
            return  # read-only and never written: no record to open either
        try:
            self._sealer.open(_blob(check), _KEY_CHECK_CONTEXT)
        except (UnsealError, TypeError) as exc:
            raise self._wrong_key() from exc
        if writable:
            # Checked with the cipher: from now on, a wrong key is refused at open without it.
            sqlite.meta_value(conn, _FINGERPRINT, self._sealer.fingerprint())
        self._key_checked = True

    def _changes_since(
        self, conn: sqlite3.Connection, cursor: str | None
    ) -> tuple[str, builtins.list[str] | None]:
        # One read transaction: a write pruning the journal between reading its bounds and
        # its entries would otherwise hide changes.
        with sqlite.read_transaction(conn):
            oldest, newest = sqlite.journal_bounds(conn)
            current = Cursor(self.backend, self._instance, int(newest or 0))
            after = readable_from(cursor, current, int(oldest or current.revision + 1))
            if after is None:
                return str(current), None
            entries = sqlite.journal_after(conn, after)
        return str(current), tenants_of(entries, after)

    def _get(self, conn: sqlite3.Connection, tenant: str) -> TenantRecord | None:
        row = conn.execute(self._select_one, (tenant,)).fetchone()
        if row is None:
            return None
        self._check_master_key(conn, writable=self.read_only is None)
        return self._record(sqlite.row_of(row))

    def _list(self, conn: sqlite3.Connection) -> builtins.list[TenantRecord]:
        records = []
        rows = conn.execute(self._select_all).fetchall()
        if rows:
            self._check_master_key(conn, writable=self.read_only is None)
        for values in rows:
            try:
                records.append(self._record(sqlite.row_of(values)))
            except StoreIntegrityError as exc:
                report_unreadable(self.backend, str(values[0]), exc)
        return records

    def _put(
        self, conn: sqlite3.Connection, record: TenantRecord, events: Sequence[Event]
    ) -> TenantRecord:
        self._check_master_key(conn, writable=True)
        sealed = (
            self._sealer.seal(record.api_key.reveal().encode(), tenant_context(record.tenant))
            if record.api_key is not None
            else None
        )
        new_version = record.version + 1
        row = sqlite.columns_for(codec.encode(record), version=new_version, sealed_key=sealed)
        with sqlite.transaction(conn):
            if record.version == 0:
                if not sqlite.insert(conn, row):
                    raise StoreConflict(
                        f"Tenant {record.tenant!r} already exists; read it again and retry.",
                        tenant=record.tenant,
                    )
            elif not sqlite.update(conn, row, expected=record.version):
                raise StoreConflict(
                    f"Tenant {record.tenant!r} changed or was removed since version"
                    f" {record.version} was read; read it again and retry.",
                    tenant=record.tenant,
                )
            sqlite.journal(conn, record.tenant, keep=self._journal_size)
            sqlite_events.insert(conn, events)
        sqlite.purge_wal(conn)
        return record.evolve(version=new_version)

    def _delete(self, conn: sqlite3.Connection, tenant: str, events: Sequence[Event]) -> bool:
        with sqlite.transaction(conn):
            deleted = sqlite.delete(conn, tenant)
            if deleted:
                sqlite.journal(conn, tenant, keep=self._journal_size)
                sqlite_events.insert(conn, events)
        if deleted:
            sqlite.purge_wal(conn)
        return deleted

    def _record(self, row: sqlite.Row) -> TenantRecord:
        tenant = str(row["tenant"])
        sealed = row["sealed_key"]
        api_key = self._unseal_key(tenant, sealed) if sealed is not None else None
        try:
            version = row["version"]
            if not isinstance(version, int):
                raise TypeError("the version is not a number")
            return codec.decode(tenant, sqlite.fields_of(row), version=version, api_key=api_key)
        except (ValueError, TypeError) as exc:
            raise _unreadable(tenant) from exc

    def _unseal_key(self, tenant: str, sealed: object) -> ApiKey:
        try:
            plaintext = self._sealer.open(_blob(sealed), tenant_context(tenant))
        except (UnsealError, TypeError) as exc:
            raise _unreadable(tenant) from exc
        try:
            return ApiKey(plaintext.decode())
        except UnicodeDecodeError:
            # Not chained: the decode error would carry the decrypted bytes.
            raise _unreadable(tenant) from None


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("not a blob")
    return value


def _unreadable(tenant: str) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"The stored record of tenant {tenant!r} cannot be read: wrong master key or tampered"
        " record. Restore the right master key, or disconnect and reconnect the tenant.",
        tenant=tenant,
    )
