"""The sandbox in process: its state, and a client that calls its app over ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from broker.sandbox import SandboxState, create_app


@pytest.fixture
def state() -> SandboxState:
    return SandboxState()


@pytest.fixture
async def client(state: SandboxState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        yield client
