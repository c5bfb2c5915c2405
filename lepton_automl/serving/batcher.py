"""Micro-batching for the server: requests that arrive within ``max_wait_ms`` of each other run as one
batch of up to ``max_batch`` examples (one ONNX Runtime call), on one worker thread so that the event
loop keeps accepting requests while the model runs. ``max_batch=1`` turns batching off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Job:
    examples: Sequence[Any]
    done: asyncio.Future


class MicroBatcher:
    def __init__(self, run: Callable[[list[Any]], np.ndarray], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.run, self.max_batch, self.max_wait = run, int(max_batch), max(0.0, float(max_wait_ms)) / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lepton-model")
        self.batches = 0  # model calls made (for /metadata and the load benchmark)
        self.examples = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, examples: Sequence[Any]) -> np.ndarray:
        """Logits for ``examples`` (one request's), computed in a batch with other requests'."""
        assert self._queue is not None, "start() the batcher first"
        job = _Job(examples, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.done

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].examples)
            ends = loop.time() + self.max_wait
            while size < self.max_batch:
                left = ends - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.examples)
            examples = [e for job in jobs for e in job.examples]
            try:
                logits = await loop.run_in_executor(self._pool, self.run, examples)
            except Exception as exc:  # the model failed: every waiting request hears why
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            self.batches += 1
            self.examples += len(examples)
            start = 0
            for job in jobs:
                if not job.done.done():
                    job.done.set_result(logits[start : start + len(job.examples)])
                start += len(job.examples)
