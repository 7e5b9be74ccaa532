"""The `broker` command line, run as a user runs it, against a real broker and sandbox."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.openbao_server import OpenBao
from support.servers import RunningBroker, RunningSandbox

from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores.local import LocalStore

REQUIRED = ["export-jobs:read", "export-jobs:write"]


def broker_cli(
    broker: RunningBroker, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = broker.token
    return subprocess.run(
        [sys.executable, "-m", "broker", "tenants", "--admin-url", broker.admin_url, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_connect_from_stdin_list_show_check_disconnect(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    result = broker_cli(broker, "connect", "acme", stdin=key.api_key + "\n")
    assert result.returncode == 0, result.stderr
    assert f"Connected acme to Pleo company {key.company_id}" in result.stdout
    assert key.api_key not in result.stdout + result.stderr

    listing = broker_cli(broker, "list")
    assert listing.returncode == 0
    header, row = listing.stdout.splitlines()
    assert header.split() == ["TENANT", "STATE", "COMPANY_ID", "KEY_HINT", "REASON", "UPDATED_AT"]
    assert row.split()[:4] == ["acme", "active", key.company_id, "…" + key.api_key[-4:]]

    shown = broker_cli(broker, "show", "acme")
    assert "state" in shown.stdout and "active" in shown.stdout

    sandbox.state.revoke(key.key_id)
    checked = broker_cli(broker, "check", "acme")
    assert checked.returncode == 0
    assert "key_rejected" in checked.stdout
    assert "broken" in broker_cli(broker, "list", "--state", "broken").stdout

    gone = broker_cli(broker, "disconnect", "acme")
    assert gone.returncode == 0
    assert "destroyed" in gone.stdout
    assert broker_cli(broker, "list").stdout.strip() == "No tenants."


def test_connect_from_key_file(
    broker: RunningBroker, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    key_file = tmp_path / "key"
    key_file.write_text(key.api_key + "\n")
    result = broker_cli(broker, "connect", "acme", "--key-file", str(key_file))
    assert result.returncode == 0, result.stderr


def test_errors_are_the_admin_apis_plain_messages(broker: RunningBroker) -> None:
    result = broker_cli(broker, "connect", "acme", stdin="pik_0000000000000000000000\n")
    assert result.returncode == 1
    assert "Pleo did not accept this key" in result.stderr
    assert "(key_invalid)" in result.stderr
    unknown = broker_cli(broker, "show", "ghost")
    assert unknown.returncode == 1
    assert "(tenant_unknown)" in unknown.stderr


def test_connect_never_takes_the_key_as_an_argument(broker: RunningBroker) -> None:
    result = broker_cli(broker, "connect", "acme", "pik_secret_in_argv")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_unreachable_admin_api_is_explained(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = "a-token-long-enough-for-the-admin-api"
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tenants", "--admin-url", "http://127.0.0.1:9", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the broker's admin API" in result.stderr
    assert "Traceback" not in result.stderr


def test_catalog_prints_the_route_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "catalog"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["METHOD", "PATH", "SCOPE"]
    assert any(line.split()[:3] == ["GET", "/v3/export-jobs", "export-jobs:read"] for line in lines)


@pytest.mark.real  # a real broker process
def test_demo_runs_to_the_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every step behaved as designed" in result.stdout
    assert "key_invalid" in result.stdout
    assert "company_mismatch" in result.stdout
    assert "scope_not_granted" in result.stdout
    assert "reason=key_rejected" in result.stdout
    assert "its installation in Pleo: status=ACTIVATED" in result.stdout


@pytest.mark.real  # OpenBao
def test_migrate_local_to_vault_prints_counts_and_no_key(tmp_path: Path, openbao: OpenBao) -> None:
    master = base64.b64encode(secrets.token_bytes(32)).decode()
    keys = ["pik_" + secrets.token_hex(20) for _ in range(2)]

    async def populate() -> None:
        store = LocalStore(tmp_path / "data", base64.b64decode(master))
        for name, key in zip(("alpha", "beta"), keys, strict=True):
            await store.put(
                TenantRecord(
                    tenant=name,
                    state=TenantState.ACTIVE,
                    api_key=ApiKey(key),
                    company_id=str(uuid.uuid4()),
                    scopes=frozenset({"export-jobs:read"}),
                )
            )
        await store.close()

    asyncio.run(populate())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    env.update(
        BROKER_STORE_PATH=str(tmp_path / "data"),
        BROKER_MASTER_KEY=master,
        BROKER_VAULT_ADDR=openbao.addr,
        BROKER_VAULT_TOKEN=openbao.root_token,
        BROKER_VAULT_PREFIX=f"cli-{uuid.uuid4().hex[:8]}",
    )
    command = [
        sys.executable,
        "-m",
        "broker",
        "tenants",
        "migrate",
        "--from",
        "local",
        "--to",
        "vault",
    ]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "2 copied, 0 updated, 0 unchanged" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert "0 copied, 0 updated, 2 unchanged" in again.stdout
    for key in keys:
        assert key not in first.stdout + first.stderr + again.stdout + again.stderr


def test_migrate_refuses_the_same_store_twice() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tenants", "migrate", "--from", "local", "--to", "local"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "same store" in result.stderr


@pytest.mark.real  # a real broker process
def test_demo_keep_running_leaves_a_usable_broker_and_stops_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        for line in process.stdout:
            lines.append(line)
            if "broker tenants list" in line:
                break
        exports = next(line for line in lines if "export BROKER_ADMIN_TOKEN=" in line).split()
        values = dict(word.split("=", 1) for word in exports if "=" in word)
        admin = f"http://127.0.0.1:{values['BROKER_ADMIN_PORT']}"
        listed = httpx.get(
            f"{admin}/v1/tenants",
            headers={"Authorization": f"Bearer {values['BROKER_ADMIN_TOKEN']}"},
        ).json()["tenants"]
        assert [(t["tenant"], t["state"]) for t in listed] == [("acme-accounting", "active")]
        link = next(line for line in lines if line.strip().startswith("connect ")).split()[1]
        page = httpx.get(link)
        assert page.status_code == 200 and 'data-state="connected"' in page.text
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("tenant", ["x/../acme", "acme#x", "acme?x=1", "Acme", "../acme"])
def test_a_tenant_argument_that_is_not_an_id_is_refused_before_any_call(
    broker: RunningBroker, sandbox: RunningSandbox, tenant: str
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    assert broker_cli(broker, "connect", "acme", stdin=key.api_key + "\n").returncode == 0
    result = broker_cli(broker, "disconnect", tenant)
    assert result.returncode == 1
    assert "is not a tenant id" in result.stderr
    assert "active" in broker_cli(broker, "show", "acme").stdout  # untouched


@pytest.mark.parametrize(
    "command",
    [["serve"], ["tenants", "migrate", "--from", "local", "--to", "vault"]],
    ids=["serve", "migrate"],
)
def test_a_bad_master_key_file_stops_as_a_setting(tmp_path: Path, command: list[str]) -> None:
    """A ConfigError found while a command opens the store is reported as a setting
    (exit 2, its own one line), not as a failure of the running command (exit 1)."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    key_file = store / "master.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {
        "BROKER_ADMIN_TOKEN": "t" * 32,
        "BROKER_STORE_PATH": str(store),
        "BROKER_PROXY_PORT": "0",
        "BROKER_ADMIN_PORT": "0",
        "BROKER_VAULT_ADDR": "http://127.0.0.1:9",
        "BROKER_VAULT_TOKEN": "unused",
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "chmod 600" in result.stderr
    assert not result.stderr.startswith("error:")


def test_link_prints_a_connect_link_that_works(
    make_broker: Callable[..., RunningBroker],
) -> None:
    running = make_broker(
        connect_public_url="https://connect.example.com",
        connect_return_origins="https://app.example.com",
    )
    result = broker_cli(
        running, "link", "acme", "--ttl", "45m", "--return-url", "https://app.example.com/x"
    )
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith("https://connect.example.com/connect/")
    assert "session cs_" in result.stderr
    assert running.connect_url is not None
    page = httpx.get(running.connect_url + url.removeprefix("https://connect.example.com"))
    assert page.status_code == 200
    refused = broker_cli(running, "link", "acme", "--return-url", "https://evil.example.net/")
    assert refused.returncode == 1 and "(request_invalid)" in refused.stderr
    bad_ttl = broker_cli(running, "link", "acme", "--ttl", "soon")
    assert bad_ttl.returncode == 2 and "not a duration" in bad_ttl.stderr


def test_link_without_a_public_url_says_how_to_turn_links_on(broker: RunningBroker) -> None:
    result = broker_cli(broker, "link", "acme")
    assert result.returncode == 1
    assert "BROKER_CONNECT_PUBLIC_URL" in result.stderr and "(connect_disabled)" in result.stderr


def events_cli(broker: RunningBroker, *args: str) -> list[str]:
    return [sys.executable, "-m", "broker", "events", "--admin-url", broker.admin_url, *args]


def test_events_prints_the_feed_with_the_cli_as_actor(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    assert broker_cli(broker, "connect", "acme", stdin=key.api_key + "\n").returncode == 0
    other = sandbox.state.create_key(scopes=REQUIRED)
    assert broker_cli(broker, "connect", "globex", stdin=other.api_key + "\n").returncode == 0
    assert broker_cli(broker, "disconnect", "globex").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = broker.token

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            events_cli(broker, *args), capture_output=True, text=True, env=env, timeout=60
        )

    lines = run().stdout.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["tenant.activated", "acme"],
        ["tenant.activated", "globex"],
        ["tenant.disconnected", "globex"],
    ]
    assert all(line.endswith("by cli") for line in lines)
    only = run("--tenant", "acme", "--json")
    assert only.returncode == 0, only.stderr
    (event,) = [json.loads(line) for line in only.stdout.splitlines()]
    assert (event["type"], event["data"]["company_id"]) == ("tenant.activated", key.company_id)
    output = run().stdout + only.stdout
    assert key.api_key not in output and other.api_key not in output


def test_events_follow_prints_new_events_and_stops_on_ctrl_c(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    assert broker_cli(broker, "connect", "acme", stdin=key.api_key + "\n").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = broker.token
    process = subprocess.Popen(
        events_cli(broker, "--follow", "--interval", "0.05"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        assert "tenant.activated" in process.stdout.readline()
        sandbox.state.revoke(key.key_id)
        assert broker_cli(broker, "check", "acme").returncode == 0
        assert "tenant.broken" in process.stdout.readline()  # found by a later poll
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
