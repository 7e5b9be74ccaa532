"""Opening the store that `BROKER_STORE` names."""

from __future__ import annotations

from typing import assert_never

from broker.settings import Settings
from broker.stores import SecretStore
from broker.stores.local import LocalStore


def open_store(settings: Settings) -> SecretStore:
    """The configured store, opened; the caller closes it."""
    match settings.store:
        case "local":
            return LocalStore(settings.store_path, settings.master_key_bytes())
        case "vault":
            # Imported here so the local store never needs hvac loaded.
            from broker.stores.vault import VaultStore

            return VaultStore.from_settings(settings)
        case _:
            assert_never(settings.store)
