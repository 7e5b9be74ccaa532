"""The callers file (README "Callers"): validation, identification, the hash command and
the watcher that reloads it (the proxy end to end is in test_proxy_callers.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from support.secret_volume import write_secret_volume

from broker import callers as callers_module
from broker import callers_watch, cli, errors
from broker.callers import CallersFileError, CallerTable, load_callers, parse_callers, token_hash
from broker.callers_watch import CallerGate
from broker.metrics import Metrics
from broker.server import is_loopback, warn_if_open_to_network
from broker.settings import Settings

TOKEN = "t" * 40
HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
OTHER = "o" * 40


def entry(**fields: object) -> str:
    base: dict[str, object] = {"name": "billing", "token_sha256": HASH, "tenants": ["acme"]}
    base.update(fields)
    lines = [
        f"  - {k}: {v!r}" if i == 0 else f"    {k}: {v!r}"
        for i, (k, v) in enumerate((k, v) for k, v in base.items() if v is not None)
    ]
    return "callers:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("callers: [", "is not valid YAML (line 1)"),
        ("- a\n", "must be a mapping with one key, 'callers'"),
        ("callers: {}\n", "'callers' must be a list"),
        ("callers:\n  - 3\n", "caller 1: must be a mapping"),
        (entry(name="Billing"), "caller 1: 'name' must be 1-63 characters"),
        (entry(name="anonymous"), "caller 1 (anonymous): 'name' must be"),
        (entry(token_sha256="abc"), "caller 1 (billing): 'token_sha256' must be 64 hex digits"),
        (entry(tenants=[]), "caller 1 (billing): 'tenants' must be a non-empty list"),
        (entry(tenants="acme"), "caller 1 (billing): 'tenants' must be a non-empty list"),
        (entry(tenants=["Acme"]), "caller 1 (billing): tenant pattern 'Acme' must be"),
        (entry(tenants=["a*c"]), "tenant pattern 'a*c' must be"),
        (entry(tenants=["-*"]), "tenant pattern '-*' must be"),
        (entry(scopes=["read"]), "caller 1 (billing): scope 'read' is not of the form"),
        (entry(scopes=[]), "'scopes' must be a non-empty list"),
        (entry(color="red"), "caller 1 (billing): unknown field 'color'"),
        (entry(tenants=["acme*"]), "caller 1 (billing): tenant pattern 'acme*' must be"),
        (entry(tenants=["ac*me-*"]), "tenant pattern 'ac*me-*' must be"),
        (entry(tenants=["**"]), "tenant pattern '**' must be"),
        (
            entry(tenants=["eu-north"]) + "    tenants: ['*']\n",
            "caller 1 (billing): the field 'tenants' is given twice",
        ),
        (
            entry(scopes=["export-jobs:read"]) + "    scopes: ['vendors:write']\n",
            "caller 1 (billing): the field 'scopes' is given twice",
        ),
        (entry() + "callers: []\n", "the key 'callers' is given twice"),
    ],
)
def test_a_bad_file_is_refused_in_one_line_naming_the_entry(text: str, complaint: str) -> None:
    with pytest.raises(CallersFileError) as raised:
        parse_callers(text, "callers.yaml")
    message = str(raised.value)
    assert message.startswith("callers.yaml: ")
    assert complaint in message
    assert "\n" not in message
    assert HASH not in message and TOKEN not in message


def test_names_and_tokens_are_unique() -> None:
    two = entry() + entry().removeprefix("callers:\n")
    with pytest.raises(CallersFileError, match=r"caller 2 \(billing\): the name is used"):
        parse_callers(two)
    renamed = entry() + entry(name="ledger").removeprefix("callers:\n")
    with pytest.raises(CallersFileError, match=r"caller 2 \(ledger\): token_sha256 is the same"):
        parse_callers(renamed)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CallersFileError, match=r"missing\.yaml: cannot read it"):
        load_callers(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(CallersFileError, match="is not UTF-8"):
        load_callers(tmp_path / "bin.yaml")


@pytest.mark.parametrize(
    ("patterns", "tenant", "allowed"),
    [
        (["acme"], "acme", True),
        (["acme"], "acme-eu", False),
        (["acme-*"], "acme-eu", True),
        (["acme-*"], "acme", False),
        (["acme-*"], "beta-acme-eu", False),
        (["*"], "anything", True),
        (["beta", "acme-*"], "beta", True),
        (["acme_*"], "acme_x", True),
        (["acme.*"], "acme.x", True),
        (["acme-*"], "acmex", False),
    ],
)
def test_tenant_patterns(patterns: list[str], tenant: str, allowed: bool) -> None:
    caller = parse_callers(entry(tenants=patterns)).identify(f"Bearer {TOKEN}".encode())
    assert caller.allows_tenant(tenant) is allowed


def test_scopes_bound_the_routes_and_unscoped_routes_are_closed_to_scoped_callers() -> None:
    caller = parse_callers(entry(scopes=["export-jobs:read"])).identify(b"Bearer " + TOKEN.encode())
    assert caller.allows_scope("export-jobs:read")
    assert not caller.allows_scope("export-jobs:write")
    assert not caller.allows_scope(None)  # a route needing no scope is outside any list
    unbounded = parse_callers(entry()).identify(b"Bearer " + TOKEN.encode())
    assert unbounded.allows_scope("vendors:write")
    assert unbounded.allows_scope(None)


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        f"Bearer {OTHER}".encode(),  # right length, wrong token
        f"Bearer {TOKEN[:-1]}".encode(),
        f"Basic {TOKEN}".encode(),
        f"Token {TOKEN}".encode(),
        f"Bearer:{TOKEN}".encode(),
        f"Bearer{TOKEN}".encode(),
        HASH.encode(),
        f"Bearer {HASH}".encode(),  # the hash is not the token
    ],
)
def test_unknown_tokens_are_unauthenticated(header: bytes | None) -> None:
    table = parse_callers(entry())
    with pytest.raises(errors.CallerUnauthenticated) as raised:
        table.identify(header)
    assert TOKEN not in raised.value.message


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_scheme_is_case_insensitive_as_http_says(scheme: str) -> None:
    assert parse_callers(entry()).identify(f"{scheme} {TOKEN}".encode()).name == "billing"


def test_a_thousand_callers_are_told_apart() -> None:
    tokens = [f"token-{i:04d}-{'x' * 30}" for i in range(1000)]
    text = "callers:\n" + "".join(
        f"  - name: c{i}\n    token_sha256: {token_hash(t)}\n    tenants: ['t{i}']\n"
        for i, t in enumerate(tokens)
    )
    table = parse_callers(text)
    assert len(table) == 1000
    assert table.identify(f"Bearer {tokens[617]}".encode()).name == "c617"


def test_a_value_seen_before_names_its_caller_without_hashing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = parse_callers(entry())
    header = f"Bearer {TOKEN}".encode()
    assert table.identify(header).name == "billing"
    hashed: list[bytes] = []
    real = hashlib.sha256

    def counting(data: bytes) -> Any:
        hashed.append(data)
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    assert table.identify(header).name == "billing"
    assert hashed == []
    # a wrong value is never remembered: each try is hashed and refused
    for _ in range(2):
        with pytest.raises(errors.CallerUnauthenticated):
            table.identify(f"Bearer {OTHER}".encode())
    assert len(hashed) == 2


def test_a_long_spelling_of_a_token_is_let_in_but_not_remembered() -> None:
    """Padding between `Bearer` and the token is accepted; remembering each padded spelling
    would let one caller fill the broker's memory (1,024 × 32 KiB)."""
    table = parse_callers(entry())
    padded = b"Bearer" + b" " * 30_000 + TOKEN.encode()
    assert table.identify(padded).name == "billing"
    assert padded not in table._known
    assert table.identify(f"Bearer {TOKEN}".encode()).name == "billing"
    assert len(table._known) == 1


def test_the_values_remembered_are_bounded_and_belong_to_one_version_of_the_file() -> None:
    tokens = [f"token-{i:04d}-{'x' * 30}" for i in range(3)]

    def file_of(kept: range) -> str:
        return "callers:\n" + "".join(
            f"  - name: c{i}\n    token_sha256: {token_hash(tokens[i])}\n    tenants: ['*']\n"
            for i in kept
        )

    table = parse_callers(file_of(range(3)))
    spellings = [f"{s} {t}".encode() for t in tokens for s in ("Bearer", "bearer", "BEARER")]
    for _ in range(callers_module.KNOWN_VALUES // len(spellings) + 2):
        for value in spellings:
            assert table.identify(value).name.startswith("c")
    assert 0 < len(table._known) <= callers_module.KNOWN_VALUES
    # the next version of the file, without c0: its table knows nothing of the old one's
    newer = parse_callers(file_of(range(1, 3)))
    with pytest.raises(errors.CallerUnauthenticated):
        newer.identify(spellings[0])
    assert newer.identify(spellings[3]).name == "c1"


# -- broker callers hash ----------------------------------------------------------------------


def test_the_hash_command_prints_the_sha256_of_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(TOKEN + "\n"))
    assert cli.main(["callers", "hash"]) == 0
    out = capsys.readouterr().out
    assert out == HASH + "\n"
    assert TOKEN not in out


def test_the_hash_command_reads_a_hidden_prompt_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: TOKEN)
    assert cli.main(["callers", "hash"]) == 0
    assert capsys.readouterr().out.strip() == HASH


def test_the_hash_command_refuses_a_short_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main(["callers", "hash"]) == 2
    assert "at least 32 characters" in capsys.readouterr().err


# -- the watcher --------------------------------------------------------------------------------


def k8s_secret(directory: Path, text: str) -> None:
    write_secret_volume(directory, {"callers.yaml": text})


async def wait_for(condition: object, seconds: float = 1.0) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < seconds, "not within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_symlink_swap_takes_effect_within_a_second(tmp_path: Path) -> None:
    k8s_secret(tmp_path, entry())
    gate = CallerGate(tmp_path / "callers.yaml")
    gate.start()
    try:
        assert gate.table.names == ("billing",)
        k8s_secret(tmp_path, entry(name="ledger"))
        await wait_for(lambda: gate.table.names == ("ledger",))
    finally:
        await gate.stop()


async def tick(gate: CallerGate, times: int = 2) -> bool:
    """Look at the file `times` times (a new version applies on the second look that finds it
    unchanged); True if the last look applied new callers."""
    applied = False
    for _ in range(times):
        applied = await gate.reload_if_changed()
    return applied


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.fields["error"]  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", "") == "callers.reload_failed"
    ]


def stale(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("broker_callers_file_stale")


async def test_a_broken_new_file_keeps_the_previous_callers_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    k8s_secret(tmp_path, entry())
    metrics = Metrics()
    gate = CallerGate(tmp_path / "callers.yaml", metrics=metrics)
    before = gate.table
    assert stale(metrics) == 0.0
    k8s_secret(tmp_path, entry(token_sha256="nothex"))
    with caplog.at_level(logging.WARNING, logger="broker"):
        assert not await tick(gate)
        assert gate.table is before
        (error,) = failures(caplog)
        assert "caller 1 (billing): 'token_sha256' must be 64 hex digits" in error
        assert "previous callers stay in force" in error
        assert stale(metrics) == 1.0
        assert not await tick(gate, 4)  # retried, but logged once per distinct error
        assert len(failures(caplog)) == 1
        k8s_secret(tmp_path, entry(tenants=["Acme"]))  # another error: logged again
        assert not await tick(gate)
        assert len(failures(caplog)) == 2
    k8s_secret(tmp_path, entry(name="fixed"))
    assert await tick(gate)
    assert gate.table.names == ("fixed",)
    assert stale(metrics) == 0.0


async def test_a_file_that_failed_to_load_is_retried_until_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    k8s_secret(tmp_path, entry())
    metrics = Metrics()
    gate = CallerGate(tmp_path / "callers.yaml", metrics=metrics)
    real = load_callers
    broken = [True]

    def flaky(path: Path) -> CallerTable:  # a transient EIO, or a file not yet readable
        if broken[0]:
            raise CallersFileError(f"callers file {path}: cannot read it: Input/output error")
        return real(path)

    monkeypatch.setattr(callers_watch, "load_callers", flaky)
    k8s_secret(tmp_path, entry(name="revoked-billing", tenants=["nobody"]))
    with caplog.at_level(logging.WARNING, logger="broker"):
        assert not await tick(gate, 3)
    assert gate.table.names == ("billing",)
    assert len(failures(caplog)) == 1
    assert stale(metrics) == 1.0
    broken[0] = False  # the disk recovered (or the mode was fixed): nothing else changed
    assert await gate.reload_if_changed()
    assert gate.table.names == ("revoked-billing",)
    assert stale(metrics) == 0.0


def test_a_change_of_mode_alone_is_a_new_version(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"
    path.write_text(entry())
    before = callers_watch.signature(path)
    os.chmod(path, 0o600)
    assert callers_watch.signature(path) != before


async def test_a_file_rewritten_in_place_applies_only_once_it_holds_still(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"
    whole = entry(scopes=["export-jobs:read"])
    path.write_text(whole)
    gate = CallerGate(path)
    with path.open("w") as file:  # truncate, then rewrite: the scopes line not written yet
        file.write(whole[: whole.index("    scopes:")])
        file.flush()
        assert parse_callers(whole[: whole.index("    scopes:")])  # valid, and unrestricted
        assert not await gate.reload_if_changed()
        assert gate.table.identify(f"Bearer {TOKEN}".encode()).scopes is not None
        file.write(whole[whole.index("    scopes:") :])
    assert not await gate.reload_if_changed()  # changed since the last look: wait one more
    assert await gate.reload_if_changed()
    assert gate.table.identify(f"Bearer {TOKEN}".encode()).scopes == frozenset({"export-jobs:read"})


async def test_a_file_that_disappears_keeps_the_previous_callers(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"
    path.write_text(entry())
    metrics = Metrics()
    gate = CallerGate(path, metrics=metrics)
    path.unlink()
    assert not await tick(gate)
    assert gate.table.names == ("billing",)
    assert stale(metrics) == 1.0


def test_a_bad_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"
    path.write_text("callers: [")
    with pytest.raises(errors.ConfigError) as raised:
        CallerGate(path)
    assert str(raised.value) == (
        f"configuration error: BROKER_CALLERS_FILE: {path}: is not valid YAML (line 1)"
    )


# -- a proxy open to the network -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_proxy_beyond_loopback_without_callers_is_logged(tmp_path: Path) -> None:
    assert warn_if_open_to_network(Settings(proxy_host="0.0.0.0"))
    assert not warn_if_open_to_network(Settings(proxy_host="127.0.0.1"))
    path = tmp_path / "callers.yaml"
    assert not warn_if_open_to_network(Settings(proxy_host="0.0.0.0", callers_file=path))


def test_the_readme_example_is_a_valid_callers_file() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```yaml\ncallers:", 1)[1].split("```", 1)[0]
    table = parse_callers("callers:" + example)
    assert table.names == ("billing", "reports")


def test_an_events_caller_is_one_more_field_and_survives_storage() -> None:
    from broker.outbox import Event, new_event

    view = {"tenant": "acme", "state": "broken"}
    plain = new_event("tenant.broken", "proxy", view)
    assert set(plain.body()) == {"id", "type", "timestamp", "actor", "data"}
    assert Event.loads(plain.dumps()).caller is None
    named = new_event("tenant.broken", "proxy", view, caller="billing")
    assert named.body()["caller"] == "billing"
    assert named.body()["actor"] == "proxy" and named.body()["data"] == view
    assert Event.loads(named.dumps()) == named


def test_broker_events_names_the_caller_after_the_actor() -> None:
    from broker.cli_events import format_event

    event = {
        "timestamp": "2026-11-30T01:00:00.000Z",
        "type": "tenant.broken",
        "actor": "proxy",
        "data": {"tenant": "acme", "state": "broken", "reason": "key_rejected"},
    }
    assert format_event(event).endswith("by proxy")
    assert format_event({**event, "caller": "billing"}).endswith("by proxy (caller billing)")
