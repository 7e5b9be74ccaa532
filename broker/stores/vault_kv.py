"""The Vault store's KV v2 calls: one secret per tenant under `<mount>/data/<prefix>/tenants/`.

Every method of `TenantSecrets` is one blocking hvac call (the store runs it on its pool);
a stale check-and-set write raises `StoreConflict`. A tenant's secret holds its record's
fields as `broker.stores.codec` encodes them plus `api_key`; a disconnect leaves a tombstone
as the newest version until the history is destroyed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.records import ApiKey, TenantRecord, valid_tenant_id
from broker.stores import codec

SecretData = dict[str, object]


class TenantSecrets:
    """The tenants' KV v2 secrets on one mount and path."""

    def __init__(self, kv: KvV2, *, mount: str, base: str) -> None:
        self._kv = kv
        self._mount = mount
        self.base = base

    def path(self, tenant: str) -> str:
        """The tenant's secret's path on the mount."""
        return f"{self.base}/{tenant}"

    def read(self, tenant: str, version: int | None) -> tuple[SecretData, int] | None:
        """The data and KV version of the tenant's secret (newest if `version` is None)."""
        try:
            response = self._kv.read_secret_version(
                path=self.path(tenant),
                version=version,
                mount_point=self._mount,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            return None
        data = response["data"]
        return data["data"], int(data["metadata"]["version"])

    def write(self, tenant: str, data: SecretData, cas: int) -> int:
        """Write `data` if the newest version is still `cas` (0: none); the new version."""
        try:
            response = self._kv.create_or_update_secret(
                path=self.path(tenant), secret=data, cas=cas, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                raise StoreConflict(tenant=tenant) from None
            raise
        return int(response["data"]["version"])

    def names(self) -> tuple[str, ...]:
        """The well-formed tenant ids that have a secret."""
        try:
            response = self._kv.list_secrets(path=self.base, mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return ()
        keys: Iterable[str] = response["data"]["keys"]
        return tuple(key for key in keys if valid_tenant_id(key))

    def versions(self, tenant: str) -> Versions | None:
        """The tenant's version list (None: no metadata at all)."""
        try:
            response = self._kv.read_secret_metadata(
                path=self.path(tenant), mount_point=self._mount
            )
        except hvac.exceptions.InvalidPath:
            return None
        return Versions.decode(response["data"])

    def destroy(self, tenant: str, versions: tuple[int, ...]) -> None:
        """Destroy those versions' data for good."""
        self._kv.destroy_secret_versions(
            path=self.path(tenant), versions=list(versions), mount_point=self._mount
        )

    def forget(self, tenant: str) -> None:
        """Delete the tenant's metadata and every version."""
        self._kv.delete_metadata_and_all_versions(path=self.path(tenant), mount_point=self._mount)


@dataclass(frozen=True, slots=True)
class Versions:
    """A tenant's KV v2 metadata: its newest version and the versions still holding data."""

    current: int
    current_readable: bool  # neither destroyed nor soft-deleted
    undestroyed: tuple[int, ...]  # a soft-deleted version still holds data (it can be undeleted)

    def live_below(self, version: int) -> tuple[int, ...]:
        """The versions older than `version` that still hold data."""
        return tuple(number for number in self.undestroyed if number < version)

    @classmethod
    def decode(cls, metadata: Mapping[str, object]) -> Versions:
        """The version list in a metadata answer."""
        versions = metadata.get("versions") or {}
        if not isinstance(versions, dict):
            raise StoreUnavailable("Vault's metadata answer has no version list")
        current = int(str(metadata.get("current_version") or 0))
        newest = versions.get(str(current), {})
        return cls(
            current=current,
            current_readable=bool(newest) and not (newest["destroyed"] or newest["deletion_time"]),
            undestroyed=tuple(
                sorted(int(number) for number, meta in versions.items() if not meta["destroyed"])
            ),
        )


def encode(record: TenantRecord) -> SecretData:
    """The secret data that stores `record` (its key in it: Vault is the key's safe)."""
    api_key = record.api_key.reveal() if record.api_key is not None else None
    return {**codec.encode(record), "api_key": api_key}


def decode(tenant: str, data: Mapping[str, object], version: int) -> TenantRecord:
    """The record a tenant's secret holds; `StoreIntegrityError` if it is not one."""
    key = data.get("api_key")
    try:
        return codec.decode(
            tenant,
            data,
            version=version,
            api_key=ApiKey(key) if isinstance(key, str) else None,
        )
    except codec.MalformedRecord as exc:
        raise StoreIntegrityError(
            f"The Vault record of tenant {tenant!r} is not a broker record; it was changed"
            " outside the broker. Disconnect and reconnect the tenant.",
            tenant=tenant,
        ) from exc


def tombstone() -> SecretData:
    """The newest version of a tenant being disconnected: holds nothing but the moment."""
    return {"tombstone": True, "disconnected_at": datetime.now(UTC).isoformat()}


def is_tombstone(data: Mapping[str, object]) -> bool:
    """True if the secret data is a tombstone."""
    return data.get("tombstone") is True
