"""The Vault store's connect sessions: one KV v2 secret each, `<prefix>/connect-sessions/<hash>`.

The secret's name is the SHA-256 hex of the link's token (never the token); writes are
check-and-set on the KV version, so two replicas counting one attempt cannot both win. Every
method is one or two blocking hvac calls, run on the store's pool.
"""

from __future__ import annotations

import re

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.connect_sessions import ConnectSession
from broker.errors import StoreConflict

_HASH = re.compile(r"[0-9a-f]{64}")


class SessionSecrets:
    """The connect sessions' KV v2 secrets on one mount and path."""

    def __init__(self, kv: KvV2, *, mount: str, base: str) -> None:
        self._kv = kv
        self._mount = mount
        self.base = base

    def write(self, session: ConnectSession) -> ConnectSession:
        """Store `session` if its KV version is still `session.version` (0: none)."""
        try:
            response = self._kv.create_or_update_secret(
                path=f"{self.base}/{session.token_hash}",
                secret=session.to_data(),
                cas=session.version,
                mount_point=self._mount,
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                raise StoreConflict(tenant=session.tenant) from None
            raise
        version = int(response["data"]["version"])
        return ConnectSession.from_data(session.to_data(), version)

    def read(self, token_hash: str) -> ConnectSession | None:
        """The session stored under `token_hash`, or None."""
        if not _HASH.fullmatch(token_hash):
            return None
        try:
            response = self._kv.read_secret_version(
                path=f"{self.base}/{token_hash}",
                mount_point=self._mount,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            return None
        data = response["data"]
        return ConnectSession.from_data(data["data"], int(data["metadata"]["version"]))

    def names(self) -> list[str]:
        """The token hashes that have a session."""
        try:
            response = self._kv.list_secrets(path=self.base, mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return []
        return [key for key in response["data"]["keys"] if _HASH.fullmatch(key)]

    def forget(self, token_hash: str) -> bool:
        """Delete the session and every version of it; False if there was none."""
        try:
            self._kv.read_secret_metadata(path=f"{self.base}/{token_hash}", mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return False
        self._kv.delete_metadata_and_all_versions(
            path=f"{self.base}/{token_hash}", mount_point=self._mount
        )
        return True
