"""The Pleo sandbox: a local stand-in for Pleo's External API (see `broker.sandbox.app`)."""

from __future__ import annotations

from broker.sandbox.app import SandboxState, create_app, run
from broker.sandbox.state import ALL_SCOPES, SandboxKey, SeenRequest

__all__ = ["ALL_SCOPES", "SandboxKey", "SandboxState", "SeenRequest", "create_app", "run"]
