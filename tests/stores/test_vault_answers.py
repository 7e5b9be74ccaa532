"""Vault's answers are data from outside: one not shaped as expected is `StoreUnavailable`
with what is wrong, whether or not Python runs with asserts (the image runs with -OO)."""

from __future__ import annotations

import pytest

from broker.errors import StoreUnavailable
from broker.stores.vault_delivery import DeliveryState
from broker.stores.vault_kv import Versions


@pytest.mark.parametrize("versions", [[1, 2], "1", 3])
def test_a_version_list_that_is_no_map_is_refused(versions: object) -> None:
    with pytest.raises(StoreUnavailable, match="no version list"):
        Versions.decode({"versions": versions, "current_version": 1})


def test_a_version_list_is_read() -> None:
    meta = {"destroyed": False, "deletion_time": ""}
    read = Versions.decode({"versions": {"1": meta, "2": meta}, "current_version": 2})
    assert read.current == 2 and read.current_readable and read.undestroyed == (1, 2)


@pytest.mark.parametrize("data", [None, "state", ["state"], {"state": "[]"}, {}])
def test_a_delivery_secret_that_is_not_one_is_refused(data: object) -> None:
    with pytest.raises(StoreUnavailable, match="delivery state in Vault cannot be read"):
        DeliveryState.decode(data)
