"""Webhook delivery state (docs/contract.md, "Webhooks"): what a store hands the deliverer.

A deliverer (one holder id per process) claims the events due for delivery with a lease:
each tenant's oldest event not yet delivered or given up, once its retry time has come. It
sends them, then settles each: delivered, retried at a later time, or given up. A holder whose
lease ran out (a process that died or stalled) settles nothing; another holder claims the
events again, so an event is sent at least once and a tenant's events in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from broker.outbox import Event

Result = Literal["delivered", "retried", "given_up"]
RESULTS: tuple[Result, ...] = ("delivered", "retried", "given_up")


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event claimed for delivery, and how many attempts at it failed before."""

    event: Event
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    """How an attempt ended: `retry_at` is set for `retried` only; `reason` says why an
    attempt failed (for the log; stores do not keep it)."""

    event_id: str
    result: Result
    retry_at: datetime | None = None
    reason: str = ""
