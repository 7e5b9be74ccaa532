"""Talking to Vault as the broker: an hvac client built from its arguments alone, and its token.

hvac falls back to the environment wherever an argument is missing: `VAULT_ADDR`,
`VAULT_TOKEN` and `~/.vault-token` (token None), `VAULT_CACERT`/`VAULT_CAPATH` (verify None),
`VAULT_CLIENT_CERT` (cert None), and its requests session reads `REQUESTS_CA_BUNDLE`,
`*_PROXY` and `.netrc`. `build_client` passes every one of them explicitly and turns
`trust_env` off, so only the broker's settings (read by `broker.stores.factory`) decide where
the broker connects and who it is (`VaultLogin`).

`TokenKeeper` logs in lazily, renews the token when less than a third of its lease is left
(checked before each call, so no background task), and logs in again when renewal fails or
Vault answers 403. Login and renewal are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
from pydantic import SecretStr

from broker.errors import StoreUnavailable
from broker.stores.runner import Run

RENEW_WHEN_LEFT = 1 / 3


def build_client(
    address: str | None,
    *,
    cacert: Path | None = None,
    namespace: str | None = None,
    timeout: float = 5.0,
    connections: int = 8,
) -> hvac.Client:
    """An hvac client for `address` that reads nothing from the environment."""
    if address is None:
        raise ValueError("BROKER_VAULT_ADDR is required for the vault store")
    session = requests.Session()
    session.trust_env = False
    pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=connections)
    session.mount("http://", pool)
    session.mount("https://", pool)
    verify: bool | str = str(cacert) if cacert is not None else True
    session.verify = verify
    session.proxies = {}
    return hvac.Client(
        url=address,
        token="",
        verify=verify,
        timeout=timeout,
        proxies={},
        session=session,
        namespace=namespace,
        adapter=_adapter_without_client_cert,
    )


def _adapter_without_client_cert(**options: Any) -> Any:
    # hvac.Client fills `cert` from VAULT_CLIENT_CERT/VAULT_CLIENT_KEY when it is None.
    options["cert"] = None
    return hvac.adapters.JSONAdapter(**options)


@dataclass(frozen=True, slots=True)
class TokenLease:
    """The broker token's lease: seconds left (0: never expires) and whether it renews."""

    ttl: float
    renewable: bool

    @classmethod
    def from_auth(cls, auth: dict[str, Any]) -> TokenLease:
        return cls(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    @classmethod
    def from_lookup(cls, data: dict[str, Any]) -> TokenLease:
        return cls(float(data.get("ttl") or 0), bool(data.get("renewable")))


@dataclass(frozen=True, slots=True)
class VaultLogin:
    """How the broker logs in to Vault: the method and what it needs (secrets stay masked)."""

    method: Literal["token", "approle", "kubernetes"] = "token"
    token: SecretStr | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    approle_mount: str = "approle"
    k8s_role: str | None = None
    k8s_mount: str = "kubernetes"
    k8s_token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def login(client: hvac.Client, credentials: VaultLogin) -> TokenLease:
    """Authenticate with the configured method and set the client's token (blocking)."""
    match credentials.method:
        case "token":
            return _token_login(client, credentials)
        case "approle":
            return _approle_login(client, credentials)
        case "kubernetes":
            return _kubernetes_login(client, credentials)


def _token_login(client: hvac.Client, credentials: VaultLogin) -> TokenLease:
    if credentials.token is None:
        raise StoreUnavailable("BROKER_VAULT_TOKEN is not set.")
    client.token = credentials.token.get_secret_value()
    return TokenLease.from_lookup(client.auth.token.lookup_self()["data"])


def _approle_login(client: hvac.Client, credentials: VaultLogin) -> TokenLease:
    if credentials.role_id is None or credentials.secret_id is None:
        raise StoreUnavailable("BROKER_VAULT_ROLE_ID and BROKER_VAULT_SECRET_ID are required.")
    response = client.auth.approle.login(
        role_id=credentials.role_id,
        secret_id=credentials.secret_id.get_secret_value(),
        mount_point=credentials.approle_mount,
    )
    return TokenLease.from_auth(response["auth"])


def _kubernetes_login(client: hvac.Client, credentials: VaultLogin) -> TokenLease:
    if credentials.k8s_role is None:
        raise StoreUnavailable("BROKER_VAULT_K8S_ROLE is required.")
    try:
        # Read on every login: projected service account tokens are rotated by the kubelet.
        jwt = credentials.k8s_token_path.read_text().strip()
    except OSError as exc:
        raise StoreUnavailable(
            f"Cannot read the Kubernetes service account token at {credentials.k8s_token_path}."
        ) from exc
    response = client.auth.kubernetes.login(
        role=credentials.k8s_role, jwt=jwt, mount_point=credentials.k8s_mount
    )
    return TokenLease.from_auth(response["auth"])


def renew(client: hvac.Client) -> TokenLease:
    """Renew the client's token (blocking)."""
    return TokenLease.from_auth(client.auth.token.renew_self()["auth"])


class TokenKeeper:
    """Keeps the client's token valid: lazy login, renewal before expiry, re-login on demand."""

    def __init__(
        self,
        client: hvac.Client,
        credentials: VaultLogin,
        run: Run,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._credentials = credentials
        self._run = run
        self._clock = clock
        self._lock = asyncio.Lock()
        self._renew_at: float | None = None
        self._renewable = False
        self.generation = 0

    async def ensure(self) -> None:
        """Log in if never done, renew (or log in again) if the token is close to expiry."""
        if self.generation and not self._due():
            return
        async with self._lock:
            if not self.generation:
                await self._login()
                return
            if not self._due():
                return
            if self._renewable:
                try:
                    self._accept(await self._run(lambda: renew(self._client)))
                except (StoreUnavailable, hvac.exceptions.VaultError):
                    pass  # expired, revoked or past its max TTL: log in afresh below
                else:
                    if not self._due():
                        return
            await self._login()

    async def relogin(self, generation: int) -> None:
        """Log in again after a 403, unless a login since `generation` already did."""
        async with self._lock:
            if self.generation == generation:
                await self._login()

    def _due(self) -> bool:
        return self._renew_at is not None and self._clock() >= self._renew_at

    async def _login(self) -> None:
        try:
            lease = await self._run(lambda: login(self._client, self._credentials))
        except hvac.exceptions.VaultError as exc:
            raise StoreUnavailable(
                f"Vault refused the broker's {self._credentials.method} login;"
                " check the broker's Vault credentials and role."
            ) from exc
        self._accept(lease)
        self.generation += 1

    def _accept(self, lease: TokenLease) -> None:
        self._renewable = lease.renewable
        if lease.ttl <= 0:
            self._renew_at = None
        else:
            self._renew_at = self._clock() + lease.ttl * (1 - RENEW_WHEN_LEFT)
