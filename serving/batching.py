"""Adaptive micro-batching (what KServe and Triton call dynamic batching), one per
worker process, run on its event loop.

A worker makes one model call at a time. A request that finds the model idle runs at
once, alone, exactly as without batching: no timer, so a lone request waits for
nothing. Requests that arrive while a call runs are parsed meanwhile and queue; when
the call ends, the queued ones go together as ONE call (one embed, one search; each
request then gets its own k, outputs, id and vote). Per-call overhead (torch dispatch,
the faiss call, Python) dominates a one-image request, so under load a merged call
serves many requests for about the price of one.

A merged call holds requests of one model snapshot only (each request reads
holder.current once, on arrival: during a swap, old-model and new-model requests go in
separate calls, and each answer names the version it was computed with) and of one
input form (dtype and image shape, so they concatenate), up to ``max_images`` images
(a single request may hold more). With ``wait_ms`` > 0 an idle worker waits that long
for company before a call, unless ``max_images`` are queued first: more merging, at a
latency cost; 0 (the default) never waits.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Queued:
    model: Any                  # the LoadedModel this request was admitted with
    key: tuple                  # input form: requests merge only with equal keys
    images: int
    item: Any                   # what run() needs of this request (its parsed input)
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """run(model, items) -> one answer per item, on ``pool``; it must not raise."""

    def __init__(self, pool, run: Callable[[Any, list], list], *, wait_ms: float = 0.0, max_images: int = 64):
        self.pool, self.run = pool, run
        self.wait, self.max_images = wait_ms / 1000.0, max_images
        self.busy = False           # a model call of this worker is running
        self.queue: list[Queued] = []
        self._timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """A request arriving now may run at once, alone (see alone())."""
        return not self.busy and not self.queue and self.wait == 0

    async def alone(self, fn: Callable, *args):
        """fn(*args) on the pool as this worker's model call: requests arriving meanwhile
        queue, and are merged when it ends."""
        self.busy = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self._release()

    async def merged(self, model, key: tuple, images: int, item) -> Any:
        """Queue a parsed request; its answer once the call that takes it has run."""
        queued = Queued(model, key, images, item)
        self.queue.append(queued)
        if not self.busy:
            if self.wait == 0 or sum(q.images for q in self.queue) >= self.max_images:
                self._start()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.wait, self._on_timer)
        return await queued.answer

    def _on_timer(self) -> None:
        self._timer = None
        if not self.busy and self.queue:
            self._start()

    def _release(self) -> None:
        self.busy = False
        if self.queue:
            self._start()

    def _take(self) -> list[Queued]:
        """The oldest live request and every queued one of its model and form that fits."""
        self.queue = [q for q in self.queue if not q.answer.done()]   # clients gone meanwhile
        if not self.queue:
            return []
        first = self.queue[0]
        batch, rest, images = [], [], 0
        for q in self.queue:
            if q.model is first.model and q.key == first.key and (not batch or images + q.images <= self.max_images):
                batch.append(q)
                images += q.images
            else:
                rest.append(q)
        self.queue = rest
        return batch

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take()
        if not batch:
            return
        self.busy = True
        call = asyncio.get_running_loop().run_in_executor(self.pool, self.run, batch[0].model,
                                                          [q.item for q in batch])
        call.add_done_callback(lambda done: self._finish(done, batch))

    def _finish(self, done: asyncio.Future, batch: list[Queued]) -> None:
        error = None if done.cancelled() else done.exception()
        for i, q in enumerate(batch):
            if q.answer.done():   # its client went away
                continue
            if done.cancelled():   # the pool shut down under it
                q.answer.cancel()
            elif error is not None:
                q.answer.set_exception(error)
            else:
                q.answer.set_result(done.result()[i])
        self._release()
