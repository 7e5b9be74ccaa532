"""Seed data for a realistic company, the same for the same seed and company.

`seed(state, company_id, seed)` gives the company employees, vendors, tax codes, a chart of
accounts, tag groups with dimensions and tags, and a pending export job over accounting
entries (whose export items `/v3/export-items` describes), so an integration test can run a
whole export. Ids, names and timestamps come from a random generator seeded with the seed
and the company id: the same call twice gives the same data (it overwrites what the last
seeding made, ids being the same), two companies never share ids. A company with an
unfinished export job keeps it rather than getting a second one (Pleo allows one).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.sandbox import subscriptions
from broker.sandbox.state import SandboxState

EPOCH = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
EMPLOYEES = (
    ("Ada", "Lovelace", "Finance Lead"),
    ("Grace", "Hopper", "Engineer"),
    ("Linus", "Torvalds", "Engineer"),
    ("Margaret", "Hamilton", "Head of Engineering"),
    ("Edsger", "Dijkstra", "Researcher"),
    ("Katherine", "Johnson", "Analyst"),
)
VENDORS = (
    ("Scandinavian Airlines", "SE", "SEK"),
    ("Hotel d'Angleterre", "DK", "DKK"),
    ("Amazon Web Services", "US", "USD"),
    ("Joe & The Juice", "DK", "DKK"),
    ("Deutsche Bahn", "DE", "EUR"),
)
TAX_CODES = (
    ("VAT 25%", 0.25, "inclusive"),
    ("EU reverse", 0.25, "reverse"),
    ("No VAT", 0, "exclusive"),
)
ACCOUNTS = (
    ("1000", "Bank"),
    ("2610", "Input VAT"),
    ("6000", "Travel"),
    ("6100", "Accommodation"),
    ("6200", "Meals"),
    ("6300", "Software"),
    ("6400", "Office supplies"),
    ("6500", "Training"),
)
TAG_GROUPS = {"Department": ("Sales", "Engineering", "Finance"), "Project": ("Apollo", "Gemini")}
ENTRIES = 12


class _Seeded:
    """A deterministic source of ids and times."""

    def __init__(self, seed: int, company_id: str) -> None:
        self.random = random.Random(f"{seed}:{company_id}")
        self.tick = 0

    def id(self) -> str:
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def time(self) -> str:
        self.tick += 1
        return (EPOCH + timedelta(minutes=7 * self.tick)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(made: _Seeded, company_id: str, **fields: Any) -> dict[str, Any]:
    at = made.time()
    return {"id": made.id(), "companyId": company_id, "createdAt": at, "updatedAt": at, **fields}


def _catalogue(state: SandboxState, made: _Seeded, company_id: str) -> dict[str, int]:
    for name, country, currency in VENDORS:
        vendor = _record(made, company_id, name=name, country=country, defaultCurrency=currency)
        vendor.update(state="ACTIVE", externalId=f"V-{made.random.randint(100, 999)}")
        state.vendors[vendor["id"]] = vendor
    for name, rate, type_ in TAX_CODES:
        tax_code = _record(made, company_id, name=name, rate=rate, type=type_, archived=False)
        tax_code.update(code=name.split()[0].upper(), ingoingTaxAccount="2610")
        state.tax_codes[tax_code["id"]] = tax_code
    accounts = state.collection("/v1/chart-of-accounts")
    for code, name in ACCOUNTS:
        account = _record(made, company_id, externalId=code, code=code, name=name, archived=False)
        accounts[account["id"]] = account
    tags = state.collection("/v0/tags")
    dimensions = state.collection("/v0/tag-groups/{groupId}/dimensions")
    for group_name, values in TAG_GROUPS.items():
        group = _record(made, company_id, name=group_name, code=group_name[:3].upper())
        group.update(archived=False, metadata={})
        state.tag_groups[group["id"]] = group
        dimension = _record(made, company_id, name="Name", code="NAME", groupId=group["id"])
        dimension.update(displayOrder=1, visible=True)
        dimensions[dimension["id"]] = dimension
        for value in values:
            tag = _record(made, company_id, name=value, code=value[:3].upper(), archived=False)
            tag["groupId"] = group["id"]
            tags[tag["id"]] = tag
    return {
        "vendors": len(VENDORS),
        "tax_codes": len(TAX_CODES),
        "accounts": len(ACCOUNTS),
        "tag_groups": len(TAG_GROUPS),
        "tags": sum(len(values) for values in TAG_GROUPS.values()),
    }


def _export_job(state: SandboxState, made: _Seeded, company_id: str, employee: str) -> str:
    """A pending export job over fresh accounting entries (unless one is unfinished)."""
    entries = [made.id() for _ in range(ENTRIES)]
    job = _record(made, company_id, status="pending", createdBy=employee)
    job.update(
        lastUpdatedAt=job["createdAt"],
        expiresIn=3600,
        isInteractive=True,
        numberOfItems=len(entries),
        vendorBasedBookkeeping=False,
        startedAt=None,
        completedAt=None,
        failureReason=None,
    )
    del job["updatedAt"]
    state.export_jobs[job["id"]] = job
    state.job_items[job["id"]] = [
        {"accountingEntryId": entry, "exportJobId": job["id"], "status": "pending"}
        for entry in entries
    ]
    return str(job["id"])


def seed(state: SandboxState, company_id: str, seed: int = 0) -> dict[str, Any]:
    """Seed the company (see the module docstring); what was made, by kind."""
    company = state.company(company_id)
    made = _Seeded(seed, company.id)  # the same ids again: seeding anew overwrites
    company.employees = [
        {
            "id": made.id(),
            "companyId": company.id,
            "firstName": first,
            "lastName": last,
            "email": f"{first.lower()}.{last.lower()}@example.com",
            "code": f"EMP-{n + 1:03d}",
            "jobTitle": title,
        }
        for n, (first, last, title) in enumerate(EMPLOYEES)
    ]
    counts = {"employees": len(EMPLOYEES), **_catalogue(state, made, company.id)}
    unfinished = [
        job
        for job in state.export_jobs.values()
        if job["companyId"] == company.id and job["status"] in ("pending", "in_progress")
    ]
    if unfinished:
        job_id = unfinished[0]["id"]
    else:
        job_id = _export_job(state, made, company.id, company.employees[0]["id"])
        subscriptions.emit(
            state, company.id, subscriptions.EXPORT_JOB_CREATED, dict(state.export_jobs[job_id])
        )
    return {"company_id": company.id, "seed": seed, "counts": counts, "export_job_id": job_id}
