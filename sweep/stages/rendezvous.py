"""Where a sweep's first trials wait for each other (see `sweep.stages.probe._wait_for_peers`).

A module of its own, importing nothing heavy: the actor's worker process loads only this file, not the
probe stage's imports (Ray Tune, pyarrow, pydantic: ~1.3 s of CPU taken from the trial workers while
they start).
"""

from __future__ import annotations

import asyncio


class Rendezvous:
    """An async Ray actor: `arrive` returns once `needed` distinct workers have arrived (or `timeout_s`
    passed), with how many had; waiting costs nothing while it lasts (no polling)."""

    def __init__(self, needed: int):
        self.needed = needed
        self.workers: set[int] = set()
        self.everyone = asyncio.Event()

    async def arrive(self, worker: int, timeout_s: float) -> int:
        self.workers.add(worker)
        if len(self.workers) >= self.needed:
            self.everyone.set()
        try:
            await asyncio.wait_for(self.everyone.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return len(self.workers)
