"""The Vault/OpenBao store: one KV v2 secret per tenant, compare-and-set on its version.

A tenant lives at `<mount>/data/<prefix>/tenants/<tenant>`; the record's `version` is the KV v2
version of that secret, and every write carries `cas=<version read>` (0: must not exist), so
Vault itself refuses a stale write. KV v2 keeps old versions: after every write each older
version is destroyed, so an old key cannot be read back from history. Destruction runs only
after the new write succeeded; if it fails (or the process dies first) the write stands, a
`store.destroy_failed` event is logged, and the history is destroyed at the tenant's next write
or by the history check: the first `list` of a store (the broker's start-up) reads every tenant's
version list in the background and destroys what a crash left (`store.history_destroyed`), and
each later `list` (a full reload) retries the destroys that failed in this process.

`delete` takes several calls and may stop after any of them, so it first writes a tombstone as
the newest version: from then on the tenant reads as gone (`get` None, absent from `list`), and a
writer still holding an older version cannot write it back (its check-and-set fails). Then every
older version is destroyed and the metadata deleted. A tenant whose newest version is a
tombstone, destroyed or soft-deleted is no tenant: `put` with version 0 writes over it (with
check-and-set on that newest version, so concurrent creators still let exactly one win), and
`delete` again finishes the job.

hvac is synchronous: every call runs in a bounded thread pool, one call per thread slot,
each bounded by `vault_timeout` (also the HTTP timeout). Transport errors, timeouts, a sealed
Vault and 5xx answers become `StoreUnavailable`.

The change journal is one more secret, `<mount>/data/<prefix>/journal`:
`{"revision": n, "epoch": <random id chosen when it was created>, "recent": [[revision,
tenant], ...]}` with the newest `journal_size` entries. After each put or delete the store
appends to it with a check-and-set read-modify-write, retried a few times because replicas
race; the appends of one process are batched, so many concurrent writes cost few journal
writes. A write whose append fails stands; a `store.journal_failed` event is logged and
readers catch up at their next full reload. `changes_since` is one read of the journal.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.events import emit
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState, valid_tenant_id
from broker.settings import Settings
from broker.stores import report_unreadable
from broker.stores.journal import NO_INSTANCE, Cursor, readable_from, tenants_of
from broker.stores.vault_auth import TokenKeeper, build_client

T = TypeVar("T")

# Entries kept in the journal. Each is one JSON string, and OpenBao refuses a request body
# holding 1,000 strings or more (its JSON complexity limit), so stay well below that.
JOURNAL_SIZE = 500
JOURNAL_SIZE_LIMIT = 900
JOURNAL_ATTEMPTS = 10
JOURNAL_VERSIONS_KEPT = 2
DELETE_ATTEMPTS = 5  # tombstone writes tried while other writers keep changing the tenant
HISTORY_CHECKS = 4  # version lists read at once by the history check (leaves slots for others)

_SERVER_TROUBLE = (
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.UnexpectedError,
    hvac.exceptions.VaultNotInitialized,
)


class VaultStore:
    """Tenant records in HashiCorp Vault or OpenBao (KV v2)."""

    backend = "vault"
    read_only: str | None = None

    def __init__(
        self,
        settings: Settings,
        *,
        client: hvac.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal_size: int = JOURNAL_SIZE,
    ) -> None:
        if not 1 <= journal_size <= JOURNAL_SIZE_LIMIT:
            raise ValueError(f"the journal keeps 1 to {JOURNAL_SIZE_LIMIT} entries")
        self._client = client if client is not None else build_client(settings)
        self._kv = self._client.secrets.kv.v2
        self._mount = settings.vault_mount.strip("/")
        prefix = settings.vault_prefix.strip("/")
        self._base = f"{prefix}/tenants"
        self._journal_path = f"{prefix}/journal"
        self._journal_size = journal_size
        self._unjournaled: builtins.list[str] = []
        self._journal_lock = asyncio.Lock()
        self._timeout = settings.vault_timeout
        self._pool = ThreadPoolExecutor(settings.vault_threads, thread_name_prefix="vault-store")
        self._slots = asyncio.Semaphore(settings.vault_threads)
        self._keeper = TokenKeeper(self._client, settings, self._run, clock=clock)
        self._where = f"{settings.vault_addr} {self._mount}/{self._base}"
        # The history check: whether every tenant's versions were checked once, the tenants
        # whose destroy failed since, and the checks running in the background.
        self._history_checked = False
        self._checking_everything = False
        self._undestroyed: set[str] = set()
        self._checks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"VaultStore({self._where!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultStore:
        """A store for the `vault_*` settings (nothing is contacted until the first call)."""
        return cls(settings)

    async def get(self, tenant: str) -> TenantRecord | None:
        if not valid_tenant_id(tenant):
            return None
        found = await self._call(lambda: self._read(tenant, None))
        if found is None or _is_tombstone(found[0]):
            return None
        return _decode(tenant, *found)

    async def _get_readable(self, tenant: str) -> TenantRecord | None:
        """`get`, but a record that cannot be read is reported and skipped (for `list`)."""
        try:
            return await self.get(tenant)
        except StoreIntegrityError as exc:
            report_unreadable(self.backend, tenant, exc)
            return None

    async def list(self) -> list[TenantRecord]:
        names = await self._call(self._list_names)
        failure: Exception | None = None
        try:
            # A TaskGroup, not gather: the first failure cancels the reads still queued.
            async with asyncio.TaskGroup() as group:
                reads = [group.create_task(self._get_readable(name)) for name in names]
        except ExceptionGroup as failed:
            failure = failed.exceptions[0]
        if failure is not None:
            raise failure
        if not self._history_checked and not self._checking_everything:
            self._check_history_later(names, everything=True)
        elif self._undestroyed:
            self._check_history_later(sorted(self._undestroyed), everything=False)
        return [record for task in reads if (record := task.result()) is not None]

    async def put(self, record: TenantRecord) -> TenantRecord:
        tenant = record.tenant
        if not valid_tenant_id(tenant):
            raise ValueError("not a valid tenant id")
        try:
            version = await self._put(tenant, _encode(record), record.version)
        except StoreUnavailable:
            self._undestroyed.add(tenant)  # it may have landed, answered too late: check it
            raise
        if version > 1:
            # Every older version is obsolete: destroy them all on every write, not only on a
            # rotation, so a key a failed destroy left behind goes at the next write (even
            # one made by another process or after a restart).
            await self._destroy_history(tenant, below=version)
        await self._journal(tenant)
        return record.evolve(version=version)

    async def delete(self, tenant: str) -> bool:
        if not valid_tenant_id(tenant):
            return False
        try:
            tombstone = await self._lay_tombstone(tenant)
            if tombstone is None:
                return False
            try:
                await self._bury(tenant, tombstone)
            finally:
                # Even if the rest failed, replicas re-read the tenant, find the tombstone and
                # stop using its key within their cache TTL.
                await self._journal(tenant)
        except StoreUnavailable:
            self._undestroyed.add(tenant)  # the history check destroys what is left
            raise
        return True

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        journal, _ = await self._call(self._read_journal)
        if journal is None:
            journal = _Journal(NO_INSTANCE, 0, ())
        current = Cursor(self.backend, journal.epoch, journal.revision)
        oldest = journal.entries[0][0] if journal.entries else journal.revision + 1
        after = readable_from(cursor, current, oldest)
        return str(current), None if after is None else tenants_of(journal.entries, after)

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        self._client.adapter.close()

    async def _put(self, tenant: str, data: dict[str, Any], cas: int) -> int:
        """Write `data` with check-and-set; its new version."""
        try:
            return await self._call(partial(self._write, tenant, data, cas))
        except StoreConflict:
            if cas != 0:
                raise
            # "Must not exist" holds too for a tenant whose disconnect was interrupted.
            gone_at = await self._gone_at(tenant)
            if gone_at is None:
                raise
            return await self._call(partial(self._write, tenant, data, gone_at))

    async def _lay_tombstone(self, tenant: str) -> int | None:
        """Write a tombstone as the tenant's newest version; its version (None: no tenant)."""
        for _ in range(DELETE_ATTEMPTS):
            versions = await self._call(partial(self._versions, tenant))
            if versions is None:
                return None
            try:
                # The point of no return: from here on the tenant reads as gone everywhere.
                return await self._call(
                    partial(self._write, tenant, _tombstone(), versions.current)
                )
            except StoreConflict:
                continue  # written meanwhile: bury the newer version
        raise StoreConflict(
            f"Tenant {tenant!r} kept changing while it was being disconnected; retry.",
            tenant=tenant,
        )

    async def _gone_at(self, tenant: str) -> int | None:
        """The newest version of a tenant that reads as gone (tombstone, destroyed), or None."""
        versions = await self._call(partial(self._versions, tenant))
        if versions is None or versions.current == 0:
            return None
        if not versions.current_readable:
            return versions.current
        found = await self._call(partial(self._read, tenant, versions.current))
        if found is None or _is_tombstone(found[0]):
            return versions.current
        return None

    async def _bury(self, tenant: str, tombstone: int) -> None:
        """Destroy every version below the tombstone, then the metadata (unless rewritten)."""
        versions = await self._call(partial(self._versions, tenant))
        if versions is None:
            return  # another disconnect finished it
        older = versions.live_below(tombstone)
        if older:
            await self._call(partial(self._destroy, tenant, older))
        if versions.current == tombstone:  # else connected again meanwhile: keep the new record
            await self._call(
                lambda: self._kv.delete_metadata_and_all_versions(
                    path=self._path(tenant), mount_point=self._mount
                )
            )

    async def _destroy_history(self, tenant: str, *, below: int) -> None:
        try:
            versions = await self._call(partial(self._versions, tenant))
            # Metadata missing or restarted below us: deleted (and perhaps created anew) since.
            if versions is not None and versions.current >= below:
                older = versions.live_below(below)
                if older:
                    await self._call(partial(self._destroy, tenant, older))
        except StoreUnavailable as exc:
            self._undestroyed.add(tenant)
            emit(
                "store.destroy_failed",
                level=logging.WARNING,
                tenant=tenant,
                backend=self.backend,
                error=exc.message,
            )

    def _check_history_later(self, tenants: Iterable[str], *, everything: bool) -> None:
        """Start a background history check of `tenants` (see the module docstring)."""
        if everything:
            self._checking_everything = True
        task = asyncio.create_task(
            self._check_history(tuple(tenants), everything), name="vault-history-check"
        )
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_history(self, tenants: tuple[str, ...], everything: bool) -> None:
        pending = iter(tenants)

        async def checker() -> None:
            for tenant in pending:  # shared by the checkers: each tenant is checked once
                await self._destroy_leftovers(tenant)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(HISTORY_CHECKS, len(tenants))):
                    group.create_task(checker())
        except* StoreUnavailable as failed:
            # Vault is in trouble: stop here; the next full reload checks again.
            emit(
                "store.destroy_failed",
                level=logging.WARNING,
                backend=self.backend,
                error=failed.exceptions[0].message,
            )
        except* Exception:
            logging.getLogger(__name__).exception("the Vault history check failed")
        else:
            if everything:
                self._history_checked = True
        finally:
            if everything:
                self._checking_everything = False

    async def _destroy_leftovers(self, tenant: str) -> None:
        """Destroy every version of `tenant` but the newest (left by a crash or a failure)."""
        versions = await self._call(partial(self._versions, tenant))
        older = () if versions is None else versions.live_below(versions.current)
        if older:
            await self._call(partial(self._destroy, tenant, older))
            emit(
                "store.history_destroyed",
                level=logging.WARNING,
                tenant=tenant,
                backend=self.backend,
                versions=len(older),
            )
        self._undestroyed.discard(tenant)

    async def _journal(self, tenant: str) -> None:
        """Append `tenant`'s change to the journal; log, never raise, if that fails."""
        self._unjournaled.append(tenant)
        async with self._journal_lock:
            if not self._unjournaled:
                return  # the append that held the lock carried this change too
            batch, self._unjournaled = self._unjournaled, []
            try:
                await self._append(batch)
            except StoreUnavailable as exc:
                emit(
                    "store.journal_failed",
                    level=logging.WARNING,
                    backend=self.backend,
                    changes=len(batch),
                    error=exc.message,
                )

    async def _append(self, tenants: builtins.list[str]) -> None:
        for _ in range(JOURNAL_ATTEMPTS):
            journal, kv_version = await self._call(self._read_journal)
            if journal is None:  # missing or unreadable: start a new one, readers reload
                journal = _Journal(secrets.token_hex(8), 0, ())
            appended = journal.append(tenants, keep=self._journal_size)
            if await self._call(partial(self._write_journal, appended, kv_version)):
                if kv_version == 0:
                    await self._call(self._limit_journal_history)
                return
        raise StoreUnavailable(
            f"The journal kept changing under the broker ({JOURNAL_ATTEMPTS} attempts)."
        )

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run one Vault call with a valid token; after a 403, log in again and retry once."""
        await self._keeper.ensure()
        generation = self._keeper.generation
        try:
            try:
                return await self._run(fn)
            except hvac.exceptions.Forbidden:
                await self._keeper.relogin(generation)
            return await self._run(fn)
        except hvac.exceptions.Forbidden as exc:
            raise StoreUnavailable(
                "Vault denied the broker access; check the broker's Vault policy and prefix."
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise StoreUnavailable("Vault rejected the broker's request.") from exc

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the pool within the timeout; translate transport and server failures."""
        async with self._slots:
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
            try:
                return await asyncio.wait_for(future, self._timeout)
            except (TimeoutError, requests.Timeout) as exc:
                raise StoreUnavailable(
                    f"Vault did not answer within {self._timeout:g} seconds."
                ) from exc
            except requests.RequestException as exc:
                raise StoreUnavailable("Vault could not be reached.") from exc
            except hvac.exceptions.VaultDown as exc:
                raise StoreUnavailable("Vault is sealed or down (503).") from exc
            except hvac.exceptions.RateLimitExceeded as exc:
                raise StoreUnavailable("Vault is rate-limiting the broker (429).") from exc
            except _SERVER_TROUBLE as exc:
                raise StoreUnavailable("Vault answered with a server error.") from exc

    def _path(self, tenant: str) -> str:
        return f"{self._base}/{tenant}"

    def _read(self, tenant: str, version: int | None) -> tuple[dict[str, Any], int] | None:
        try:
            response = self._kv.read_secret_version(
                path=self._path(tenant),
                version=version,
                mount_point=self._mount,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            return None
        data = response["data"]
        return data["data"], int(data["metadata"]["version"])

    def _write(self, tenant: str, data: dict[str, Any], cas: int) -> int:
        try:
            response = self._kv.create_or_update_secret(
                path=self._path(tenant), secret=data, cas=cas, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                raise StoreConflict(tenant=tenant) from None
            raise
        return int(response["data"]["version"])

    def _read_journal(self) -> tuple[_Journal | None, int]:
        """The journal (None if missing or unreadable) and its KV version (0: missing)."""
        try:
            # A soft-deleted journal still has a version, which the next write's CAS needs.
            response = self._kv.read_secret_version(
                path=self._journal_path, mount_point=self._mount, raise_on_deleted_version=False
            )
        except hvac.exceptions.InvalidPath:
            return None, 0
        data = response["data"]
        return _Journal.decode(data["data"]), int(data["metadata"]["version"])

    def _write_journal(self, journal: _Journal, kv_version: int) -> bool:
        """Check-and-set write of the journal; False if another writer came first."""
        try:
            self._kv.create_or_update_secret(
                path=self._journal_path,
                secret=journal.encode(),
                cas=kv_version,
                mount_point=self._mount,
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                return False
            raise
        return True

    def _limit_journal_history(self) -> None:
        # Old journal versions hold nothing secret; keeping few just saves space.
        self._kv.update_metadata(
            path=self._journal_path, max_versions=JOURNAL_VERSIONS_KEPT, mount_point=self._mount
        )

    def _list_names(self) -> tuple[str, ...]:
        try:
            response = self._kv.list_secrets(path=self._base, mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return ()
        keys: Iterable[str] = response["data"]["keys"]
        return tuple(key for key in keys if valid_tenant_id(key))

    def _versions(self, tenant: str) -> _Versions | None:
        """The tenant's version list (None: no metadata at all)."""
        try:
            response = self._kv.read_secret_metadata(
                path=self._path(tenant), mount_point=self._mount
            )
        except hvac.exceptions.InvalidPath:
            return None
        return _Versions.decode(response["data"])

    def _destroy(self, tenant: str, versions: tuple[int, ...]) -> None:
        self._kv.destroy_secret_versions(
            path=self._path(tenant), versions=list(versions), mount_point=self._mount
        )


@dataclass(frozen=True, slots=True)
class _Versions:
    """A tenant's KV v2 metadata: its newest version and the versions still holding data."""

    current: int
    current_readable: bool  # neither destroyed nor soft-deleted
    undestroyed: tuple[int, ...]  # a soft-deleted version still holds data (it can be undeleted)

    def live_below(self, version: int) -> tuple[int, ...]:
        return tuple(number for number in self.undestroyed if number < version)

    @classmethod
    def decode(cls, metadata: dict[str, Any]) -> _Versions:
        versions: dict[str, dict[str, Any]] = metadata.get("versions") or {}
        current = int(metadata.get("current_version") or 0)
        newest = versions.get(str(current), {})
        return cls(
            current=current,
            current_readable=bool(newest) and not (newest["destroyed"] or newest["deletion_time"]),
            undestroyed=tuple(
                sorted(int(number) for number, meta in versions.items() if not meta["destroyed"])
            ),
        )


@dataclass(frozen=True, slots=True)
class _Journal:
    epoch: str
    revision: int
    entries: tuple[tuple[int, str], ...]

    def append(self, tenants: Iterable[str], *, keep: int) -> _Journal:
        entries = list(self.entries)
        revision = self.revision
        for tenant in tenants:
            revision += 1
            entries.append((revision, tenant))
        return _Journal(self.epoch, revision, tuple(entries[-keep:]))

    def encode(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "epoch": self.epoch,
            "recent": [[revision, tenant] for revision, tenant in self.entries],
        }

    @classmethod
    def decode(cls, data: object) -> _Journal | None:
        if not isinstance(data, dict):
            return None
        epoch, revision, recent = data.get("epoch"), data.get("revision"), data.get("recent")
        if not (isinstance(epoch, str) and epoch.isalnum() and type(revision) is int):
            return None
        if not isinstance(recent, list):
            return None
        entries: builtins.list[tuple[int, str]] = []
        for entry in recent:
            if not (isinstance(entry, list) and len(entry) == 2):
                return None
            number, tenant = entry
            if type(number) is not int or not isinstance(tenant, str):
                return None
            entries.append((number, tenant))
        return cls(epoch, revision, tuple(entries))


def _tombstone() -> dict[str, Any]:
    """The newest version of a tenant being disconnected: holds nothing but the moment."""
    return {"tombstone": True, "disconnected_at": datetime.now(UTC).isoformat()}


def _is_tombstone(data: dict[str, Any]) -> bool:
    return data.get("tombstone") is True


def _encode(record: TenantRecord) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "state": record.state.value,
        "api_key": record.api_key.reveal() if record.api_key is not None else None,
        "company_id": record.company_id,
        "scopes": sorted(record.scopes),
        "missing_scopes": list(record.missing_scopes),
        "reason": record.reason.value if record.reason is not None else None,
        "message": record.message,
        "activated_at": _iso(record.activated_at),
        "updated_at": _iso(record.updated_at),
        "last_checked_at": _iso(record.last_checked_at),
        "client_id": record.client_id,
        "application_name": record.application_name,
    }


def _decode(tenant: str, data: dict[str, Any], version: int) -> TenantRecord:
    try:
        return _decode_fields(tenant, data, version)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreIntegrityError(
            f"The Vault record of tenant {tenant!r} is not a broker record; it was changed"
            " outside the broker. Disconnect and reconnect the tenant.",
            tenant=tenant,
        ) from exc


def _decode_fields(tenant: str, data: dict[str, Any], version: int) -> TenantRecord:
    key = data.get("api_key")
    reason = data.get("reason")
    return TenantRecord(
        tenant=tenant,
        state=TenantState(data["state"]),
        api_key=ApiKey(key) if isinstance(key, str) else None,
        company_id=data.get("company_id"),
        scopes=frozenset(data.get("scopes") or ()),
        missing_scopes=tuple(data.get("missing_scopes") or ()),
        reason=BrokenReason(reason) if reason else None,
        message=data.get("message"),
        activated_at=_parse(data.get("activated_at")),
        updated_at=datetime.fromisoformat(data["updated_at"]),
        last_checked_at=_parse(data.get("last_checked_at")),
        version=version,
        client_id=_text(data.get("client_id")),  # absent from older records
        application_name=_text(data.get("application_name")),
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _parse(text: object) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None
