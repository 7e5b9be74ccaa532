"""The sandbox over real sockets: `run()` on the broker's listeners, Basic auth on the wire, and a
"drop" fault that the client sees as a broken connection, not as a 500."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.sandbox_helpers import basic
from support.servers import RunningSandbox

STARTUP_DEADLINE = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SandboxProcess:
    """`broker.sandbox.run()` in a child process, on a free port of 127.0.0.1."""

    def __init__(self, state_file: Path | None = None) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        code = f"from broker.sandbox import run; run('127.0.0.1', {port})"
        command = [sys.executable, "-c", code]
        if state_file is not None:  # as a user runs it: `broker sandbox --state-file`
            command = [sys.executable, "-m", "broker", "sandbox", "--port", str(port)]
            command += ["--state-file", str(state_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/_sandbox/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:  # pause between polls by waiting on the child, which also notices an exit
                self.process.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"sandbox exited: {self.stop()}")
        raise AssertionError("sandbox did not start in time")

    def stop(self) -> str:
        """Stop the child; what it wrote to standard error."""
        self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate(timeout=10)
        return stderr.decode()


@pytest.fixture
def sandbox_process() -> Iterator[SandboxProcess]:
    child = SandboxProcess()
    try:
        child.wait_until_ready()
        yield child
    finally:
        if child.process.returncode is None:
            child.stop()


def exercise_over_the_wire(url: str) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
        created = client.post("/_sandbox/keys", json={"scopes": ["export-jobs:read"]}).json()
        auth = basic(created["api_key"])

        introspected = client.get("/v1/introspect", headers=auth)
        assert introspected.status_code == 200
        assert introspected.json()["data"]["subjectURN"].endswith(created["company_id"])
        assert client.get("/v1/introspect").status_code == 401
        bearer = {"Authorization": f"Bearer {created['api_key']}"}
        assert client.get("/v1/introspect", headers=bearer).status_code == 401

        fault = {"path_prefix": "/v3/", "kind": "drop", "times": 1}
        assert client.post("/_sandbox/faults", json=fault).status_code == 201
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            client.get("/v3/export-jobs", headers=auth)
        # the next request (a new connection) is answered normally
        assert client.get("/v3/export-jobs", headers=auth).status_code == 200

        client.post(
            "/_sandbox/faults", json={"path_prefix": "/v3/", "kind": "status", "status": 429}
        )
        limited = client.get("/v3/export-jobs", headers=auth)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
        assert client.delete("/_sandbox/faults").status_code == 204

        seen = client.get("/_sandbox/requests").json()["requests"]
        assert [r["path"] for r in seen].count("/v3/export-jobs") == 3
        assert created["api_key"] not in str(seen)


@pytest.mark.real  # a real server process
def test_run_serves_the_sandbox_on_the_listeners(sandbox_process: SandboxProcess) -> None:
    exercise_over_the_wire(sandbox_process.url)
    stderr = sandbox_process.stop()
    # a drop must not be a crash that the listener answers or logs as a 500
    assert "Traceback" not in stderr and "app_failed" not in stderr, stderr


def test_sandbox_fixture_serves_over_the_wire(sandbox: RunningSandbox) -> None:
    exercise_over_the_wire(sandbox.url)


@pytest.mark.real  # real server processes
def test_a_restarted_sandbox_keeps_its_keys_with_a_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "sandbox.json"
    first = SandboxProcess(state_file)
    try:
        first.wait_until_ready()
        created = httpx.post(f"{first.url}/_sandbox/keys", json={}).json()
        auth = basic(created["api_key"])
        vendor = {"companyId": created["company_id"], "name": "Acme", "defaultCurrency": "DKK"}
        made = httpx.post(f"{first.url}/v1/vendors", json=vendor, headers=auth)
        assert made.status_code == 201, made.text
    finally:
        first.stop()
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert created["api_key"] not in state_file.read_text()

    second = SandboxProcess(state_file)
    try:
        second.wait_until_ready()
        vendor_id = made.json()["data"]["id"]
        again = httpx.get(f"{second.url}/v1/vendors/{vendor_id}", headers=auth)
        assert again.status_code == 200 and again.json()["data"]["name"] == "Acme"
    finally:
        second.stop()


@pytest.mark.real  # a real process
def test_a_bad_state_file_is_refused_with_one_line(tmp_path: Path) -> None:
    state_file = tmp_path / "sandbox.json"
    state_file.write_text("{not json")
    child = SandboxProcess(state_file)
    try:
        code = child.process.wait(timeout=STARTUP_DEADLINE)
    finally:
        stderr = child.stop()
    assert code == 1
    assert "is not a sandbox state file" in stderr and "Traceback" not in stderr
