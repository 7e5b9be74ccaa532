"""The Vault store's change journal: one more KV v2 secret, `<mount>/data/<prefix>/journal`.

It holds `{"revision": n, "epoch": <random id chosen when it was created>, "recent":
[[revision, tenant], ...]}` with the newest `size` entries. After each put or delete the store
appends to it with a check-and-set read-modify-write, retried a few times because replicas
race; the appends of one process are batched, so many concurrent writes cost few journal
writes. A write whose append fails stands; a `store.journal_failed` event is logged and
readers catch up at their next full reload. `changes_since` is one read of the journal.
How cursors are read against it: `broker.stores.journal`.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.errors import StoreUnavailable
from broker.events import emit
from broker.stores.journal import NO_INSTANCE, Cursor, readable_from, tenants_of
from broker.stores.runner import Run

# Entries kept in the journal. Each is one JSON string, and OpenBao refuses a request body
# holding 1,000 strings or more (its JSON complexity limit), so stay well below that.
JOURNAL_SIZE = 500
JOURNAL_SIZE_LIMIT = 900
JOURNAL_ATTEMPTS = 10
JOURNAL_VERSIONS_KEPT = 2


@dataclass(frozen=True, slots=True)
class Journal:
    """The journal secret's contents."""

    epoch: str
    revision: int
    entries: tuple[tuple[int, str], ...]

    def append(self, tenants: Iterable[str], *, keep: int) -> Journal:
        """The journal with one entry per tenant added, only the newest `keep` kept."""
        entries = list(self.entries)
        revision = self.revision
        for tenant in tenants:
            revision += 1
            entries.append((revision, tenant))
        return Journal(self.epoch, revision, tuple(entries[-keep:]))

    def encode(self) -> dict[str, object]:
        """The secret's data."""
        return {
            "revision": self.revision,
            "epoch": self.epoch,
            "recent": [[revision, tenant] for revision, tenant in self.entries],
        }

    @classmethod
    def decode(cls, data: object) -> Journal | None:
        """The journal `data` holds, or None if it is not one."""
        if not isinstance(data, dict):
            return None
        epoch, revision, recent = data.get("epoch"), data.get("revision"), data.get("recent")
        if not (isinstance(epoch, str) and epoch.isalnum() and type(revision) is int):
            return None
        entries = _entries(recent)
        return None if entries is None else cls(epoch, revision, entries)


def _entries(recent: object) -> tuple[tuple[int, str], ...] | None:
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
    return tuple(entries)


class VaultJournal:
    """Appends this process's changes to the journal secret and reads the others' from it."""

    def __init__(
        self,
        kv: KvV2,
        call: Run,
        *,
        mount: str,
        path: str,
        size: int = JOURNAL_SIZE,
    ) -> None:
        self._kv = kv
        self._call = call
        self._mount = mount
        self.path = path
        self._size = size
        self._unjournaled: builtins.list[str] = []
        self._lock = asyncio.Lock()

    async def record(self, tenant: str, *, backend: str) -> None:
        """Append `tenant`'s change to the journal; log, never raise, if that fails."""
        self._unjournaled.append(tenant)
        async with self._lock:
            if not self._unjournaled:
                return  # the append that held the lock carried this change too
            batch, self._unjournaled = self._unjournaled, []
            try:
                await self._append(batch)
            except StoreUnavailable as exc:
                emit(
                    "store.journal_failed",
                    level=logging.WARNING,
                    backend=backend,
                    changes=len(batch),
                    error=exc.message,
                )

    async def changes_since(
        self, cursor: str | None, *, backend: str
    ) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        journal, _ = await self._read()
        if journal is None:
            journal = Journal(NO_INSTANCE, 0, ())
        current = Cursor(backend, journal.epoch, journal.revision)
        oldest = journal.entries[0][0] if journal.entries else journal.revision + 1
        after = readable_from(cursor, current, oldest)
        return str(current), None if after is None else tenants_of(journal.entries, after)

    async def _append(self, tenants: builtins.list[str]) -> None:
        for _ in range(JOURNAL_ATTEMPTS):
            journal, kv_version = await self._read()
            if journal is None:  # missing or unreadable: start a new one, readers reload
                journal = Journal(secrets.token_hex(8), 0, ())
            appended = journal.append(tenants, keep=self._size)
            if await self._call(partial(self._write, appended, kv_version)):
                if kv_version == 0:
                    await self._call(self._limit_history)
                return
        raise StoreUnavailable(
            f"The journal kept changing under the broker ({JOURNAL_ATTEMPTS} attempts)."
        )

    async def _read(self) -> tuple[Journal | None, int]:
        return await self._call(self._read_now)

    def _read_now(self) -> tuple[Journal | None, int]:
        """The journal (None if missing or unreadable) and its KV version (0: missing)."""
        try:
            # A soft-deleted journal still has a version, which the next write's CAS needs.
            response = self._kv.read_secret_version(
                path=self.path, mount_point=self._mount, raise_on_deleted_version=False
            )
        except hvac.exceptions.InvalidPath:
            return None, 0
        data = response["data"]
        return Journal.decode(data["data"]), int(data["metadata"]["version"])

    def _write(self, journal: Journal, kv_version: int) -> bool:
        """Check-and-set write of the journal; False if another writer came first."""
        try:
            self._kv.create_or_update_secret(
                path=self.path, secret=journal.encode(), cas=kv_version, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                return False
            raise
        return True

    def _limit_history(self) -> None:
        # Old journal versions hold nothing secret; keeping few just saves space.
        self._kv.update_metadata(
            path=self.path, max_versions=JOURNAL_VERSIONS_KEPT, mount_point=self._mount
        )
