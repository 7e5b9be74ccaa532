"""The one record codec both stores use: round trips, older records, malformed ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.stores import codec

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)

BROKEN = TenantRecord(
    tenant="acme",
    state=TenantState.BROKEN,
    api_key=ApiKey("pleo-key-0123456789abcdef"),
    company_id="company-1",
    scopes=frozenset({"export-jobs:write", "export-jobs:read"}),
    missing_scopes=("export-jobs:write",),
    reason=BrokenReason.PERMISSION_LOST,
    message="a scope is gone",
    activated_at=T0,
    updated_at=T0,
    last_checked_at=T0,
    version=7,
    client_id="client-1",
    application_name="Acme ERP",
    installation_status="ACTIVATED",
    installation_synced_at=T0,
    installation_error="Pleo answered HTTP 503 while reading the installation",
)
PENDING = TenantRecord(tenant="globex", state=TenantState.PENDING, api_key=None, updated_at=T0)


@pytest.mark.parametrize("record", [BROKEN, PENDING], ids=["every-field", "fewest-fields"])
def test_a_record_round_trips(record: TenantRecord) -> None:
    fields = codec.encode(record)
    decoded = codec.decode(record.tenant, fields, version=record.version, api_key=record.api_key)
    assert decoded == record


def test_encoding_holds_neither_key_nor_version_and_only_json_values() -> None:
    fields = codec.encode(BROKEN)
    assert "api_key" not in fields and "version" not in fields
    assert BROKEN.api_key is not None and BROKEN.api_key.reveal() not in repr(fields)
    assert fields["scopes"] == ["export-jobs:read", "export-jobs:write"]  # sorted: stable
    assert fields["updated_at"] == "2025-03-14T09:26:53+00:00"
    assert all(isinstance(value, str | list | None) for value in fields.values())


def test_a_record_written_before_the_installation_fields_still_decodes() -> None:
    fields: dict[str, Any] = dict(codec.encode(BROKEN))
    del fields["installation_status"], fields["installation_synced_at"]
    del fields["installation_error"]
    decoded = codec.decode("acme", fields, version=7, api_key=BROKEN.api_key)
    assert decoded == BROKEN.evolve(
        installation_status=None, installation_synced_at=None, installation_error=None
    )


def test_a_record_written_before_the_integration_fields_still_decodes() -> None:
    fields: dict[str, Any] = dict(codec.encode(BROKEN))
    del fields["client_id"], fields["application_name"]
    decoded = codec.decode("acme", fields, version=7, api_key=BROKEN.api_key)
    assert decoded == BROKEN.evolve(client_id=None, application_name=None)


@pytest.mark.parametrize(
    "change",
    [
        {"state": None},
        {"state": "sleeping"},
        {"updated_at": None},
        {"updated_at": "yesterday"},
        {"reason": "bored"},
        {"scopes": "export-jobs:read"},
        {"missing_scopes": [1, 2]},
        {"activated_at": "not a time"},
    ],
)
def test_a_malformed_record_raises_one_error(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {**codec.encode(BROKEN), **change}
    with pytest.raises(codec.MalformedRecord, match="'acme'"):
        codec.decode("acme", fields, version=7, api_key=None)


def test_a_missing_required_field_is_malformed() -> None:
    fields: dict[str, Any] = dict(codec.encode(BROKEN))
    del fields["state"]
    with pytest.raises(codec.MalformedRecord):
        codec.decode("acme", fields, version=7, api_key=None)


def test_tenants_of_one_integration_share_their_common_values_in_memory() -> None:
    # 50,000 tenants of one integration hold the same scopes, client id and application
    # name: one copy of each, not 50,000 (as each store reads them: fresh JSON values).
    first, second = (
        codec.decode(f"t{i}", json.loads(json.dumps(codec.encode(BROKEN))), version=1, api_key=None)
        for i in range(2)
    )
    assert first.scopes == BROKEN.scopes and first.scopes is second.scopes
    assert first.client_id == "client-1" and first.client_id is second.client_id
    assert first.application_name is second.application_name
    fields = {**codec.encode(BROKEN), "scopes": ["x:read"]}
    other = codec.decode("t3", fields, version=1, api_key=None)
    assert other.scopes == frozenset({"x:read"}) and other.scopes is not first.scopes
