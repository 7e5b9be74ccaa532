"""`--state-file`: the sandbox's state saved after each change and loaded on start."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support.sandbox_helpers import basic

from broker.sandbox import create_app
from broker.sandbox.persist import StateFileError, load


def _client(state_file: Path) -> httpx.AsyncClient:
    app = create_app(load(state_file), state_file)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sandbox")


async def test_keys_records_and_settings_survive_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    async with _client(state_file) as client:
        created = (await client.post("/_sandbox/keys", json={"expires_in": 3600})).json()
        revoked = (await client.post("/_sandbox/keys", json={})).json()
        await client.post(f"/_sandbox/keys/{revoked['key_id']}/revoke")
        auth = basic(created["api_key"])
        seeded = (await client.post("/_sandbox/seed", json={"key_id": created["key_id"]})).json()
        hook = {"endpointUrl": "http://127.0.0.1:9/", "eventTypes": ["v1.export-job.created"]}
        subscription = (await client.post("/v1/subscriptions", json=hook, headers=auth)).json()
        secret = await client.get(
            f"/v1/subscriptions/{subscription['data']['id']}/secret", headers=auth
        )
        await client.put("/_sandbox/rate-limit", json={"requests_per_second": 50, "burst": 60})
    saved = state_file.read_text()
    assert created["api_key"] not in saved and revoked["api_key"] not in saved

    async with _client(state_file) as client:
        job = await client.get(f"/v3/export-jobs/{seeded['export_job_id']}", headers=auth)
        assert job.status_code == 200, job.text
        items = await client.get(f"/v3/export-jobs/{seeded['export_job_id']}/items", headers=auth)
        assert len(items.json()["data"]) == 12
        again = await client.get(
            f"/v1/subscriptions/{subscription['data']['id']}/secret", headers=auth
        )
        assert again.json() == secret.json()
        employees = await client.get("/v2/employees", headers=auth)
        assert len(employees.json()["data"]) == 6
        gone = await client.get("/v1/introspect", headers=basic(revoked["api_key"]))
        assert gone.status_code == 401
        limit = await client.get("/_sandbox/rate-limit")
        assert limit.json() == {"requests_per_second": 50, "burst": 60}


async def test_reads_do_not_rewrite_the_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    async with _client(state_file) as client:
        await client.get("/_sandbox/health")
        assert not state_file.exists()
        await client.post("/_sandbox/keys", json={})
        assert json.loads(state_file.read_text())["version"] == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [("{not json", "not a sandbox state file"), ('{"version": 99}', "version 99")],
)
def test_an_unreadable_state_file_is_refused(tmp_path: Path, text: str, words: str) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text(text)
    with pytest.raises(StateFileError, match=words):
        load(state_file)
