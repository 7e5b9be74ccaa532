"""An OpenBao with raft storage on disk, so that it can be killed and started again with its data.

Dev mode keeps everything in memory; the replica tests need "Vault went away and came back
with the same secrets", which takes a real (non-dev) server: initialised once with one
unseal key, unsealed after every start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from support.openbao_server import START_DEADLINE, OpenBao


@dataclass
class PersistentOpenBao(OpenBao):
    initialised: bool = False

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "bao.hcl"
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        config.write_text(
            f'storage "raft" {{\n path = "{data}"\n node_id = "broker-test"\n}}\n'
            f'listener "tcp" {{\n address = "127.0.0.1:{self.port}"\n tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "http://127.0.0.1:{self.port + 1}"\n'
        )
        self._log = (self.workdir / "bao.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "server", f"-config={config}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)},
            cwd=self.workdir,
        )
        self._wait_for(lambda status: status is not None)
        if not self.initialised:
            answer = self._api("PUT", "/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.unseal_key = answer["keys"][0]
            self.root_token = answer["root_token"]
            self.initialised = True
            self._unseal()
            self._api("POST", "/v1/sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        else:
            self._unseal()

    def stop(self) -> None:
        super().stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Kill -9: no goodbye to anyone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _unseal(self) -> None:
        self._api("PUT", "/v1/sys/unseal", {"key": self.unseal_key})
        self._wait_for(lambda status: status == 200)

    def _wait_for(self, ready: Any) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while not ready(self.health()):
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"bao exited; see {self.workdir / 'bao.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao not ready in {START_DEADLINE}s")
            time.sleep(0.02)  # polling readiness, bounded by the deadline

    def _api(self, method: str, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.addr + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"X-Vault-Token": self.root_token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None
