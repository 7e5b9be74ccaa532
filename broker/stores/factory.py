"""Opening the store that `BROKER_STORE` names: the one place that reads the store settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, assert_never

from broker.settings import Settings
from broker.stores import SecretStore
from broker.stores.local import LocalStore

if TYPE_CHECKING:
    import hvac

    from broker.stores.vault import VaultStore
    from broker.stores.vault_auth import VaultLogin


def open_store(settings: Settings) -> SecretStore:
    """The configured store, opened; the caller closes it."""
    match settings.store:
        case "local":
            return LocalStore(settings.store_path, settings.master_key_bytes())
        case "vault":
            return open_vault_store(settings)
        case _:
            assert_never(settings.store)


def open_vault_store(
    settings: Settings,
    *,
    client: hvac.Client | None = None,
    clock: Callable[[], float] = time.monotonic,
    journal_size: int | None = None,
) -> VaultStore:
    """A Vault store for the `vault_*` settings (nothing is contacted until the first call)."""
    # Imported here so the local store never needs hvac loaded.
    from broker.stores.vault import JOURNAL_SIZE, VaultOptions, VaultStore

    options = VaultOptions(
        mount=settings.vault_mount,
        prefix=settings.vault_prefix,
        timeout=settings.vault_timeout,
        threads=settings.vault_threads,
        journal_size=journal_size if journal_size is not None else JOURNAL_SIZE,
        event_retention=timedelta(days=settings.event_retention_days),
    )
    client = client if client is not None else vault_client(settings)
    return VaultStore(client, vault_login(settings), options, clock=clock)


def vault_client(settings: Settings) -> hvac.Client:
    """An hvac client for the `vault_*` settings that reads nothing from the environment."""
    from broker.stores.vault_auth import build_client

    return build_client(
        settings.vault_addr,
        cacert=settings.vault_cacert,
        namespace=settings.vault_namespace,
        timeout=settings.vault_timeout,
        connections=settings.vault_threads,
    )


def vault_login(settings: Settings) -> VaultLogin:
    """How the `vault_*` settings say the broker logs in to Vault."""
    from broker.stores.vault_auth import VaultLogin

    return VaultLogin(
        method=settings.vault_auth,
        token=settings.vault_token,
        role_id=settings.vault_role_id,
        secret_id=settings.vault_secret_id,
        approle_mount=settings.vault_approle_mount,
        k8s_role=settings.vault_k8s_role,
        k8s_mount=settings.vault_k8s_mount,
        k8s_token_path=settings.vault_k8s_token_path,
    )
