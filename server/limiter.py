"""Runs CPU-bound work off the event loop, a few at a time, with a bounded queue.

CKKS evaluation holds a core for its whole duration, so running more evaluations than the
limit only makes each slower; a request past the queue's end is refused at once with 503
and a Retry-After rather than held until its client times out. Everything runs on the one
event loop, so the admission counter needs no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from he_inference.errors import OverloadedError
from server.metrics import Metrics

T = TypeVar("T")


class EvaluationLimiter:
    """At most ``max_concurrency`` jobs in worker threads and ``max_queue`` waiting."""

    def __init__(
        self, max_concurrency: int, max_queue: int, retry_after_s: float, metrics: Metrics
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._limiter: anyio.CapacityLimiter | None = None
        self._admitted = 0

    @property
    def waiting(self) -> int:
        """Jobs admitted and not yet running."""
        return max(0, self._admitted - self.max_concurrency)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a worker thread once a slot is free.

        Raises:
            OverloadedError: every slot is busy and the queue is full.
        """
        if self._admitted >= self.max_concurrency + self.max_queue:
            raise OverloadedError(
                f"{self.max_concurrency} evaluations are running and {self.max_queue} are "
                f"waiting: retry in {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s,
            )
        if self._limiter is None:  # made on the running loop, which anyio requires
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)
        self._admitted += 1
        self._update()
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=self._limiter)
        finally:
            self._admitted -= 1
            self._update()

    def _update(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.in_flight.set(min(self._admitted, self.max_concurrency))
