"""Old import path of `support.openbao_server`, for test files not moved to it yet."""

from __future__ import annotations

from support.openbao_server import BROKER_POLICY as BROKER_POLICY
from support.openbao_server import OpenBao as OpenBao
from support.openbao_server import vault_settings as vault_settings
