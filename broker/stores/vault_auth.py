"""Talking to Vault as the broker: an hvac client built from settings alone, and its token.

hvac falls back to the environment wherever an argument is missing: `VAULT_ADDR`,
`VAULT_TOKEN` and `~/.vault-token` (token None), `VAULT_CACERT`/`VAULT_CAPATH` (verify None),
`VAULT_CLIENT_CERT` (cert None), and its requests session reads `REQUESTS_CA_BUNDLE`,
`*_PROXY` and `.netrc`. `build_client` passes every one of them explicitly and turns
`trust_env` off, so only `Settings` decides where the broker connects and who it is.

`TokenKeeper` logs in lazily, renews the token when less than a third of its lease is left
(checked before each call, so no background task), and logs in again when renewal fails or
Vault answers 403. Login and renewal are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters

from broker.errors import StoreUnavailable
from broker.settings import Settings

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], Awaitable[T]]

RENEW_WHEN_LEFT = 1 / 3


def build_client(settings: Settings) -> hvac.Client:
    """An hvac client for `settings.vault_addr` that reads nothing from the environment."""
    if settings.vault_addr is None:
        raise ValueError("BROKER_VAULT_ADDR is required for the vault store")
    session = requests.Session()
    session.trust_env = False
    pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=settings.vault_threads)
    session.mount("http://", pool)
    session.mount("https://", pool)
    verify: bool | str = str(settings.vault_cacert) if settings.vault_cacert is not None else True
    session.verify = verify
    session.proxies = {}
    return hvac.Client(
        url=settings.vault_addr,
        token="",
        verify=verify,
        timeout=settings.vault_timeout,
        proxies={},
        session=session,
        namespace=settings.vault_namespace,
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


def login(client: hvac.Client, settings: Settings) -> TokenLease:
    """Authenticate with the configured method and set the client's token (blocking)."""
    method = settings.vault_auth
    if method == "token":
        if settings.vault_token is None:
            raise StoreUnavailable("BROKER_VAULT_TOKEN is not set.")
        client.token = settings.vault_token.get_secret_value()
        return TokenLease.from_lookup(client.auth.token.lookup_self()["data"])
    if method == "approle":
        if settings.vault_role_id is None or settings.vault_secret_id is None:
            raise StoreUnavailable("BROKER_VAULT_ROLE_ID and BROKER_VAULT_SECRET_ID are required.")
        response = client.auth.approle.login(
            role_id=settings.vault_role_id,
            secret_id=settings.vault_secret_id.get_secret_value(),
            mount_point=settings.vault_approle_mount,
        )
        return TokenLease.from_auth(response["auth"])
    if settings.vault_k8s_role is None:
        raise StoreUnavailable("BROKER_VAULT_K8S_ROLE is required.")
    try:
        # Read on every login: projected service account tokens are rotated by the kubelet.
        jwt = settings.vault_k8s_token_path.read_text().strip()
    except OSError as exc:
        raise StoreUnavailable(
            f"Cannot read the Kubernetes service account token at {settings.vault_k8s_token_path}."
        ) from exc
    response = client.auth.kubernetes.login(
        role=settings.vault_k8s_role, jwt=jwt, mount_point=settings.vault_k8s_mount
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
        settings: Settings,
        run: Runner[TokenLease],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._settings = settings
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
            lease = await self._run(lambda: login(self._client, self._settings))
        except hvac.exceptions.VaultError as exc:
            raise StoreUnavailable(
                f"Vault refused the broker's {self._settings.vault_auth} login;"
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
