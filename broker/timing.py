"""What each proxied answer tells its caller about where its time went (`Server-Timing`).

`broker;dur` is the time the broker itself spent on the request until its answer started
(reading the head, the policy, the body checks, the upstream slot, relaying the headers);
`pleo;dur` is the wait from sending to Pleo until Pleo's answer headers arrived. Both in
milliseconds. The broker's own refusals carry only `broker;dur`. The broker's part is also
observed in the histogram `broker_overhead_seconds`, beside `broker_upstream_duration_seconds`.
"""

from __future__ import annotations

from time import perf_counter
from typing import NamedTuple

from prometheus_client import Histogram

from broker.wire import Response

SERVER_TIMING = b"server-timing"


class Sent(NamedTuple):
    """A request sent to Pleo, with its answer's headers in."""

    response: Response
    began: float  # perf_counter() when the request arrived
    waited: float  # seconds from sending to Pleo until its answer headers arrived


class Overhead:
    """Builds the `Server-Timing` header and observes the broker's part."""

    def __init__(self, histogram: Histogram) -> None:
        self._observe = histogram.observe

    def proxied(self, sent: Sent) -> tuple[tuple[bytes, bytes], float]:
        """The header of an answer relayed from Pleo (its headers about to be sent), and the
        broker's part to `observe` once the answer is out (not on the answer's way)."""
        spent = perf_counter() - sent.began - sent.waited
        value = b"broker;dur=%.3f, pleo;dur=%.3f" % (spent * 1000, sent.waited * 1000)
        return (SERVER_TIMING, value), spent

    def observe(self, spent: float) -> None:
        """Count the broker's part of a relayed answer (`proxied`'s second value)."""
        self._observe(spent)

    def refused(self, began: float) -> tuple[bytes, bytes]:
        """The header of the broker's own answer (nothing, or nothing usable, from Pleo)."""
        spent = perf_counter() - began
        self._observe(spent)
        return SERVER_TIMING, f"broker;dur={spent * 1000:.3f}".encode()
