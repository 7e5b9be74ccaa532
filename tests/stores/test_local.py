"""The embedded store: what is on disk, the master key, and sharing one file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import shutil
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from support.filesystems import fill, freeze, tmpfs, writable_until_frozen
from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox

from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.records import ApiKey, TenantRecord, TenantState
from broker.settings import ConfigError, load_settings
from broker.stores.crypto import Sealer
from broker.stores.factory import open_store
from broker.stores.local import LocalStore


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "broker-data"


@pytest.fixture
async def store(store_dir: Path) -> AsyncIterator[LocalStore]:
    opened = LocalStore(store_dir, master_key=os.urandom(32))
    try:
        yield opened
    finally:
        await opened.close()


def new_key() -> ApiKey:
    return ApiKey(f"pls_{secrets.token_hex(20)}_{secrets.token_hex(12)}")


def record(tenant: str, api_key: ApiKey | None = None) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=api_key if api_key is not None else new_key(),
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read"}),
    )


def files_holding(directory: Path, needle: bytes) -> list[str]:
    """Names of the files in `directory` whose bytes contain `needle` (never the bytes)."""
    return [name for name in names_in(directory) if needle in (directory / name).read_bytes()]


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sealed_key_of(directory: Path, tenant: str) -> bytes:
    with sqlite3.connect(directory / "tenants.db") as conn:
        row = conn.execute("SELECT sealed_key FROM tenants WHERE tenant = ?", (tenant,)).fetchone()
    conn.close()
    return bytes(row[0])


async def test_no_key_is_on_disk_in_clear(store: LocalStore, store_dir: Path) -> None:
    keys = [new_key() for _ in range(5)]
    stored = [await store.put(record(f"tenant-{n}", key)) for n, key in enumerate(keys)]
    rotated = new_key()
    await store.put(stored[0].evolve(api_key=rotated))

    assert (store_dir / "tenants.db-wal").exists()
    for key in [*keys, rotated]:
        secret = key.reveal().encode()
        assert files_holding(store_dir, secret) == []
        assert files_holding(store_dir, secret[4:20]) == []
        assert files_holding(store_dir, base64.b64encode(secret)[:24]) == []
    # The ciphertext is there, a little longer than the key (nonce + tag).
    assert len(sealed_key_of(store_dir, "tenant-1")) == len(keys[1].reveal()) + 12 + 16


async def test_store_files_are_private(store: LocalStore, store_dir: Path) -> None:
    await store.put(record("acme"))

    assert mode_of(store_dir) == 0o700
    for name in ("tenants.db", "tenants.db-wal", "tenants.db-shm"):
        assert mode_of(store_dir / name) & 0o077 == 0, name


async def test_a_ciphertext_moved_to_another_tenant_does_not_decrypt(
    store: LocalStore, store_dir: Path
) -> None:
    await store.put(record("acme"))
    await store.put(record("globex"))
    acme, globex = sealed_key_of(store_dir, "acme"), sealed_key_of(store_dir, "globex")
    with sqlite3.connect(store_dir / "tenants.db") as conn:
        conn.execute("UPDATE tenants SET sealed_key = ? WHERE tenant = 'acme'", (globex,))
        conn.execute("UPDATE tenants SET sealed_key = ? WHERE tenant = 'globex'", (acme,))
    conn.close()

    with pytest.raises(StoreIntegrityError) as refused:
        await store.get("acme")
    await store.put(record("initech"))
    assert [r.tenant for r in await store.list()] == ["initech"]  # the bad ones are skipped

    error = refused.value
    assert (error.status, error.code, error.tenant) == (500, "store_integrity", "acme")
    assert "'acme'" in error.message
    assert "wrong master key or tampered record" in error.message


async def test_an_altered_ciphertext_does_not_decrypt(store: LocalStore, store_dir: Path) -> None:
    await store.put(record("acme"))
    sealed = bytearray(sealed_key_of(store_dir, "acme"))
    sealed[20] ^= 0x01
    with sqlite3.connect(store_dir / "tenants.db") as conn:
        conn.execute("UPDATE tenants SET sealed_key = ?", (bytes(sealed),))
    conn.close()

    with pytest.raises(StoreIntegrityError, match="tenant 'acme'"):
        await store.get("acme")


async def test_a_wrong_master_key_is_refused_at_open(store_dir: Path) -> None:
    first = LocalStore(store_dir, master_key=os.urandom(32))
    await first.put(record("acme"))
    await first.close()

    with pytest.raises(StoreIntegrityError, match="wrong master key"):
        LocalStore(store_dir, master_key=os.urandom(32))


def no_cipher(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, loading the cipher (cryptography) fails the test."""

    def refused(self: Sealer) -> None:
        raise AssertionError("the cipher was loaded")

    monkeypatch.setattr(Sealer, "_cipher", refused)


async def test_a_store_without_records_refuses_a_wrong_master_key_at_open(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that sealed a key once, and holds no record now: a wrong master key is
    refused at start, not at the first activation, and without loading the cipher (the
    store keeps a fingerprint of its key: docs/decisions.md)."""
    master_key = os.urandom(32)
    first = LocalStore(store_dir, master_key=master_key)
    await first.put(record("acme"))
    assert await first.delete("acme")
    await first.close()

    no_cipher(monkeypatch)
    with pytest.raises(StoreIntegrityError, match="wrong master key") as refused:
        LocalStore(store_dir, master_key=os.urandom(32))
    assert refused.value.message.startswith("The master key does not open ")
    assert "\n" not in refused.value.message
    right = LocalStore(store_dir, master_key=master_key)  # the right key opens it, cipher-less
    try:
        assert await right.list() == []
    finally:
        await right.close()


def fingerprint_of(directory: Path) -> object:
    with sqlite3.connect(directory / "tenants.db") as conn:
        row = conn.execute("SELECT value FROM meta WHERE name = 'key_fingerprint'").fetchone()
    conn.close()
    return None if row is None else row[0]


async def test_the_fingerprint_tells_the_key_without_holding_it(store_dir: Path) -> None:
    master_key = os.urandom(32)
    store = LocalStore(store_dir, master_key=master_key)
    try:
        await store.put(record("acme"))
    finally:
        await store.close()
    fingerprint = fingerprint_of(store_dir)
    assert isinstance(fingerprint, str) and len(fingerprint) == 64  # HMAC-SHA256, hex
    for form in (master_key, master_key.hex().encode(), base64.b64encode(master_key)):
        assert files_holding(store_dir, form) == []
    assert fingerprint != hashlib.sha256(master_key).hexdigest()  # keyed, not a bare hash


async def test_a_store_made_before_fingerprints_is_checked_once_then_fingerprinted(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master_key = os.urandom(32)
    first = LocalStore(store_dir, master_key=master_key)
    await first.put(record("acme"))
    assert await first.delete("acme")
    await first.close()
    with sqlite3.connect(store_dir / "tenants.db") as conn:  # as a store made before them
        conn.execute("DELETE FROM meta WHERE name = 'key_fingerprint'")
    conn.close()

    # Its sealed key check still refuses a wrong key at open (the cipher loaded for it).
    with pytest.raises(StoreIntegrityError, match="wrong master key"):
        LocalStore(store_dir, master_key=os.urandom(32))
    assert fingerprint_of(store_dir) is None
    # The right key passes the check, and the store is fingerprinted from then on.
    await LocalStore(store_dir, master_key=master_key).close()
    assert fingerprint_of(store_dir) is not None
    no_cipher(monkeypatch)
    with pytest.raises(StoreIntegrityError, match="wrong master key"):
        LocalStore(store_dir, master_key=os.urandom(32))


async def test_a_store_that_never_sealed_a_key_takes_any_master_key(store_dir: Path) -> None:
    """Nothing sealed, nothing to protect: the key is bound at the first key sealed."""
    await LocalStore(store_dir, master_key=os.urandom(32)).close()
    assert fingerprint_of(store_dir) is None
    master_key = os.urandom(32)
    store = LocalStore(store_dir, master_key=master_key)
    try:
        await store.put(record("acme"))
    finally:
        await store.close()
    assert fingerprint_of(store_dir) is not None


async def test_a_store_checks_the_first_key_it_seals_against_later_opens(
    store_dir: Path,
) -> None:
    master_key = os.urandom(32)
    first = LocalStore(store_dir, master_key=master_key)
    await first.close()  # opened and closed without a key sealed: nothing to check yet
    second = LocalStore(store_dir, master_key=master_key)
    await second.put(record("acme"))
    await second.close()

    with pytest.raises(StoreIntegrityError, match="wrong master key"):
        LocalStore(store_dir, master_key=os.urandom(32))
    reopened = LocalStore(store_dir, master_key=master_key)
    try:
        assert [r.tenant for r in await reopened.list()] == ["acme"]
    finally:
        await reopened.close()


def test_a_master_key_of_the_wrong_length_is_refused(store_dir: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalStore(store_dir, master_key=os.urandom(16))


async def test_without_a_master_key_a_private_key_file_is_created_and_reused(
    store_dir: Path,
) -> None:
    key = new_key()
    first = LocalStore(store_dir)
    await first.put(record("acme", key))
    await first.close()
    key_file = store_dir / "master.key"
    assert mode_of(key_file) == 0o600
    content = key_file.read_bytes()

    second = LocalStore(store_dir)
    try:
        stored = await second.get("acme")
    finally:
        await second.close()

    assert stored is not None
    assert stored.api_key == key
    assert key_file.read_bytes() == content
    assert len(base64.b64decode(content.strip(), validate=True)) == 32


async def test_stores_starting_together_agree_on_one_key_file(store_dir: Path) -> None:
    stores = await asyncio.gather(*(asyncio.to_thread(LocalStore, store_dir) for _ in range(6)))
    try:
        written = await stores[0].put(record("acme"))
        for each in stores:
            assert await each.get("acme") == written
    finally:
        for each in stores:
            await each.close()
    assert [name for name in names_in(store_dir) if "master" in name] == ["master.key"]


async def test_the_key_file_works_as_master_key_setting(store_dir: Path) -> None:
    first = LocalStore(store_dir)
    await first.put(record("acme"))
    await first.close()
    setting = (store_dir / "master.key").read_bytes().strip()
    (store_dir / "master.key").unlink()

    second = LocalStore(store_dir, master_key=base64.b64decode(setting))
    try:
        assert await second.get("acme") is not None
    finally:
        await second.close()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
async def test_a_key_file_others_may_read_is_refused(store_dir: Path, mode: int) -> None:
    await LocalStore(store_dir).close()
    key_file = store_dir / "master.key"
    key_file.chmod(mode)

    with pytest.raises(ConfigError, match="chmod 600") as refused:
        LocalStore(store_dir)

    assert str(key_file) in str(refused.value)


@pytest.mark.parametrize(
    "content",
    [b"", base64.b64encode(os.urandom(16)), base64.b64encode(os.urandom(33)), b"not base64!"],
    ids=["empty", "16-bytes", "33-bytes", "garbage"],
)
def test_a_key_file_of_the_wrong_length_is_refused(store_dir: Path, content: bytes) -> None:
    store_dir.mkdir(mode=0o700)
    key_file = store_dir / "master.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(content)

    with pytest.raises(ConfigError, match="32 base64-encoded bytes") as refused:
        LocalStore(store_dir)

    assert str(key_file) in str(refused.value)


async def test_a_lost_key_file_is_not_silently_replaced(store_dir: Path) -> None:
    await LocalStore(store_dir).close()
    (store_dir / "master.key").unlink()

    with pytest.raises(ConfigError, match=r"master\.key is missing"):
        LocalStore(store_dir)

    assert not (store_dir / "master.key").exists()


async def test_two_stores_on_one_file_see_each_others_writes(store_dir: Path) -> None:
    master_key = os.urandom(32)
    one = LocalStore(store_dir, master_key=master_key)
    two = LocalStore(store_dir, master_key=master_key)
    try:
        created = await one.put(record("acme"))
        seen = await two.get("acme")
        assert seen == created

        updated = await two.put(created.evolve(message="changed by two"))
        with pytest.raises(StoreConflict):
            await one.put(created.evolve(message="changed by one"))
        assert await one.get("acme") == updated

        assert await one.delete("acme") is True
        assert await two.list() == []
    finally:
        await one.close()
        await two.close()


WRITER = """
import asyncio, base64, sys
from pathlib import Path
from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores.local import LocalStore

async def main() -> None:
    master_key = base64.b64decode(sys.stdin.readline())
    api_key = ApiKey(sys.stdin.readline().strip())
    store = LocalStore(Path(sys.argv[1]), master_key)
    stored = await store.put(TenantRecord(sys.argv[2], TenantState.ACTIVE, api_key))
    await store.close()
    print(stored.version)

asyncio.run(main())
"""


async def test_a_write_from_another_process_is_seen(store_dir: Path) -> None:
    master_key = os.urandom(32)
    store = LocalStore(store_dir, master_key=master_key)
    key = new_key()
    try:
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            str(store_dir),
            "acme",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        secrets_in = base64.b64encode(master_key) + b"\n" + key.reveal().encode() + b"\n"
        out, _ = await asyncio.wait_for(writer.communicate(secrets_in), timeout=30)
        assert (writer.returncode, out.strip()) == (0, b"1")

        seen = await store.get("acme")
        assert seen is not None
        assert (seen.version, seen.api_key) == (1, key)
        with pytest.raises(StoreConflict):
            await store.put(seen.evolve(version=0))
    finally:
        await store.close()


async def test_racing_stores_on_one_file_let_exactly_one_win(store_dir: Path) -> None:
    master_key = os.urandom(32)
    stores = [LocalStore(store_dir, master_key=master_key) for _ in range(4)]
    try:
        base = await stores[0].put(record("acme"))
        candidates = [base.evolve(api_key=new_key(), message=f"store {n}") for n in range(4)]

        results = await asyncio.gather(
            *(s.put(c) for s, c in zip(stores, candidates, strict=True)), return_exceptions=True
        )

        winners = [r for r in results if isinstance(r, TenantRecord)]
        assert len(winners) == 1
        assert sum(isinstance(r, StoreConflict) for r in results) == 3
        for each in stores:
            assert await each.get("acme") == winners[0]
    finally:
        for each in stores:
            await each.close()


async def test_delete_overwrites_the_ciphertext(store: LocalStore, store_dir: Path) -> None:
    await store.put(record("acme"))
    await store.put(record("globex"))
    sealed = sealed_key_of(store_dir, "acme")
    assert files_holding(store_dir, sealed) == ["tenants.db"]

    assert await store.delete("acme") is True

    assert files_holding(store_dir, sealed) == []
    assert files_holding(store_dir, sealed[12:28]) == []


async def test_rotation_overwrites_the_previous_ciphertext(
    store: LocalStore, store_dir: Path
) -> None:
    first = await store.put(record("acme"))
    await store.put(record("globex"))
    old_sealed = sealed_key_of(store_dir, "acme")
    # A longer key moves the row within its page, leaving the old cell behind unless wiped.
    longer = ApiKey(new_key().reveal() + secrets.token_hex(8))

    await store.put(first.evolve(api_key=longer))

    assert files_holding(store_dir, old_sealed[12:28]) == []
    assert files_holding(store_dir, sealed_key_of(store_dir, "acme")) == ["tenants.db"]


async def test_a_locked_database_is_store_unavailable(store_dir: Path) -> None:
    store = LocalStore(store_dir, master_key=os.urandom(32), busy_timeout=0.05)
    blocker = sqlite3.connect(store_dir / "tenants.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.put(record("acme"))
        blocker.execute("ROLLBACK")
        assert (await store.put(record("acme"))).version == 1
    finally:
        blocker.close()
        await store.close()


async def test_a_closed_store_is_unavailable(store_dir: Path) -> None:
    store = LocalStore(store_dir, master_key=os.urandom(32))
    await store.close()
    await store.close()

    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("acme")


async def test_a_malformed_tenant_id_is_never_written(store: LocalStore) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        await store.put(record("../Acme"))

    assert await store.list() == []


async def test_repr_and_errors_never_show_the_key(store: LocalStore, store_dir: Path) -> None:
    key = new_key()
    await store.put(record("acme", key))
    with sqlite3.connect(store_dir / "tenants.db") as conn:
        conn.execute("UPDATE tenants SET tenant = 'other' WHERE tenant = 'acme'")
    conn.close()

    with pytest.raises(StoreIntegrityError) as refused:
        await store.get("other")

    shown = f"{store!r} {refused.value!r} {refused.value} {refused.value.to_body()}"
    assert key.reveal() not in shown
    assert "other" in shown


async def test_open_store_opens_the_local_store(store_dir: Path) -> None:
    settings = load_settings(
        store="local",
        store_path=store_dir,
        master_key=base64.b64encode(os.urandom(32)).decode(),
    )

    store = open_store(settings)
    try:
        assert isinstance(store, LocalStore)
        assert store.backend == "local"
        assert (await store.put(record("acme"))).version == 1
    finally:
        await store.close()
    assert not (store_dir / "master.key").exists()


# The schema of the first release, before `client_id` and `application_name`.
_FIRST_SCHEMA = """
CREATE TABLE tenants (
    tenant TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL,
    company_id TEXT, scopes TEXT NOT NULL, missing_scopes TEXT NOT NULL, reason TEXT,
    message TEXT, activated_at TEXT, updated_at TEXT NOT NULL, last_checked_at TEXT,
    sealed_key BLOB
)
"""


async def test_a_store_made_before_the_integration_fields_opens_and_keeps_working(
    store_dir: Path,
) -> None:
    master_key = os.urandom(32)
    opened = LocalStore(store_dir, master_key=master_key)
    old = await opened.put(record("acme"))
    await opened.close()
    # Rebuild the file as the first release left it: same row, no integration columns.
    db = store_dir / "tenants.db"
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE tenants RENAME TO tenants_new")
        conn.execute(_FIRST_SCHEMA)
        conn.execute(
            "INSERT INTO tenants SELECT tenant, version, state, company_id, scopes,"
            " missing_scopes, reason, message, activated_at, updated_at, last_checked_at,"
            " sealed_key FROM tenants_new"
        )
        conn.execute("DROP TABLE tenants_new")
    conn.close()

    reopened = LocalStore(store_dir, master_key=master_key)
    try:
        read = await reopened.get("acme")
        assert read == old and read is not None
        assert (read.client_id, read.application_name) == (None, None)
        assert (read.installation_status, read.installation_synced_at) == (None, None)
        stored = await reopened.put(
            read.evolve(
                client_id="c-1", application_name="Acme ERP", installation_status="ACTIVATED"
            )
        )
        assert await reopened.get("acme") == stored
        assert (stored.client_id, stored.application_name) == ("c-1", "Acme ERP")
        assert stored.installation_status == "ACTIVATED"
    finally:
        await reopened.close()


# -- a read-only store (issue 8, item 17) ---------------------------------------------------------


@pytest.mark.parametrize("shutdown", ["clean", "crashed"])
async def test_a_read_only_store_serves_every_record_and_refuses_writes(
    tmp_path: Path, shutdown: str
) -> None:
    master_key = os.urandom(32)
    source = tmp_path / "source"
    writer = LocalStore(source, master_key=master_key)
    acme = await writer.put(record("acme"))
    globex = await writer.put(record("globex"))
    with writable_until_frozen(tmp_path / "read-only") as directory:
        if shutdown == "clean":  # SQLite removed the -wal and -shm files
            await writer.close()
        for name in names_in(source):  # after a crash they are still there
            shutil.copy2(source / name, directory / name)
        await writer.close()
        freeze(directory)

        store = LocalStore(directory, master_key=master_key)
        try:
            assert store.read_only is not None and "cannot be written" in store.read_only
            assert await store.get("acme") == acme
            assert await store.list() == [acme, globex]
            cursor, _ = await store.changes_since(None)
            assert (await store.changes_since(cursor))[1] == []
            with pytest.raises(StoreUnavailable, match="read-only"):
                await store.put(record("initech"))
            with pytest.raises(StoreUnavailable, match="read-only"):
                await store.put(acme.evolve(message="changed"))
            with pytest.raises(StoreUnavailable, match="read-only"):
                await store.delete("acme")
        finally:
            await store.close()


async def test_a_read_only_store_with_the_wrong_master_key_is_still_refused(
    tmp_path: Path,
) -> None:
    with writable_until_frozen(tmp_path / "read-only") as directory:
        writer = LocalStore(directory, master_key=os.urandom(32))
        await writer.put(record("acme"))
        await writer.close()
        freeze(directory)

        with pytest.raises(StoreIntegrityError, match="master key"):
            LocalStore(directory, master_key=os.urandom(32))


def test_a_broker_on_a_read_only_store_starts_serves_and_says_degraded(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, tmp_path: Path
) -> None:
    tenant = {"X-Broker-Tenant": "acme"}
    with writable_until_frozen(tmp_path / "store") as directory:
        first = make_broker(store_path=directory)
        key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
        connected = httpx.put(
            f"{first.admin_url}/v1/tenants/acme/key",
            headers=first.auth,
            json={"api_key": key.api_key},
        )
        assert connected.status_code == 200
        first.thread.stop()
        freeze(directory)

        assert first.settings.master_key is not None
        broker = make_broker(
            store_path=directory, master_key=first.settings.master_key.get_secret_value()
        )
        try:
            ready = httpx.get(f"{broker.admin_url}/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert "cannot be written" in ready.json()["store"]
            assert (
                httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant).status_code == 200
            )
            assert sandbox.state.requests[-1].key_id == key.key_id
            shown = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth)
            assert shown.json()["state"] == "active"
            other = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
            refused = httpx.put(
                f"{broker.admin_url}/v1/tenants/newco/key",
                headers=broker.auth,
                json={"api_key": other.api_key},
            )
            assert (refused.status_code, refused.json()["error"]["code"]) == (
                503,
                "store_unavailable",
            )
            assert "read-only" in refused.json()["error"]["message"]
        finally:
            broker.thread.stop()


# -- a full disk (issue 8, item 18) ---------------------------------------------------------------


def test_a_full_disk_makes_the_broker_degraded_and_its_views_show_what_the_proxy_enforces(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, tmp_path: Path
) -> None:
    tenant = {"X-Broker-Tenant": "acme"}
    with tmpfs(tmp_path / "store", size="1m") as directory:
        broker = make_broker(store_path=directory)
        try:
            admin = httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False)
            with admin:
                full_disk(broker, admin, sandbox, directory, tenant)
        finally:
            broker.thread.stop()


def full_disk(
    broker: RunningBroker,
    admin: httpx.Client,
    sandbox: RunningSandbox,
    directory: Path,
    tenant: dict[str, str],
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).status_code == 200
    filler = fill(directory)
    other = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    refused = admin.put("/v1/tenants/newco/key", json={"api_key": other.api_key})
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "store_unavailable")
    assert "full" in refused.json()["error"]["message"]

    # Pleo revokes the key: the proxy stops using it although the break cannot be saved...
    sandbox.state.revoke(key.key_id)
    httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant)
    blocked = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant)
    assert blocked.status_code == 424
    # ...and the admin views say so, not what the store still holds.
    shown = admin.get("/v1/tenants/acme").json()
    assert (shown["state"], shown["reason"]) == ("broken", "key_rejected")
    assert [t["state"] for t in admin.get("/v1/tenants").json()["tenants"]] == ["broken"]
    ready = httpx.get(f"{broker.admin_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert "full" in ready.json()["store"]

    filler.unlink()  # space again: the held break is written at the next refresh
    deadline = time.monotonic() + 5
    while httpx.get(f"{broker.admin_url}/readyz").json()["status"] != "ok":
        assert time.monotonic() < deadline, "readiness did not recover"
        time.sleep(0.02)
    shown = admin.get("/v1/tenants/acme").json()
    assert (shown["state"], shown["reason"]) == ("broken", "key_rejected")


async def test_a_read_only_store_made_before_the_integration_fields_is_served(
    tmp_path: Path,
) -> None:
    # The columns added since the first release cannot be added to a read-only file:
    # such a store still serves every record, the new fields unknown.
    master_key = os.urandom(32)
    with writable_until_frozen(tmp_path / "read-only") as directory:
        writer = LocalStore(directory, master_key=master_key)
        old = await writer.put(record("acme"))
        await writer.close()
        with sqlite3.connect(directory / "tenants.db") as conn:
            conn.execute("ALTER TABLE tenants DROP COLUMN client_id")
            conn.execute("ALTER TABLE tenants DROP COLUMN application_name")
            for column in ("installation_status", "installation_synced_at", "installation_error"):
                conn.execute(f"ALTER TABLE tenants DROP COLUMN {column}")
        conn.close()
        freeze(directory)

        store = LocalStore(directory, master_key=master_key)
        try:
            assert store.read_only is not None
            assert await store.get("acme") == old
            assert await store.list() == [old]
        finally:
            await store.close()


async def test_a_read_only_store_with_changes_only_in_its_log_is_refused(tmp_path: Path) -> None:
    # A crash after a commit but before the checkpoint leaves the change in -wal alone. Read
    # without a -shm file, SQLite would ignore it and serve a deleted tenant's key again.
    master_key = os.urandom(32)
    source = tmp_path / "source"
    writer = LocalStore(source, master_key=master_key)
    await writer.put(record("acme"))
    await writer.close()
    with writable_until_frozen(tmp_path / "read-only") as directory:
        conn = sqlite3.connect(source / "tenants.db")
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("DELETE FROM tenants WHERE tenant = 'acme'")
            conn.commit()
            for name in ("tenants.db", "tenants.db-wal"):
                shutil.copy2(source / name, directory / name)
        finally:
            conn.close()
        assert (directory / "tenants.db-wal").stat().st_size > 0
        freeze(directory)

        with pytest.raises(StoreUnavailable, match="write-ahead log"):
            LocalStore(directory, master_key=master_key)


@pytest.mark.parametrize("stored", ["é" * 64, "", "00"], ids=["non-ascii", "empty", "short"])
async def test_a_damaged_fingerprint_is_a_wrong_key_not_a_crash(
    store_dir: Path, stored: str
) -> None:
    master_key = os.urandom(32)
    first = LocalStore(store_dir, master_key=master_key)
    await first.put(record("acme"))
    await first.close()
    with sqlite3.connect(store_dir / "tenants.db") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'key_fingerprint'", (stored,))
    with pytest.raises(StoreIntegrityError, match="wrong master key"):
        LocalStore(store_dir, master_key=master_key)
