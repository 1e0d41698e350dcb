"""A fixed-size worker pool with a bounded queue for the server's decode + inference jobs.

``workers`` threads run jobs (PIL decoding and ONNX Runtime release the GIL, so the event
loop keeps answering ``/health`` while they run); at most ``queue`` more jobs wait. A job
offered when ``workers + queue`` are taken is refused at once with :class:`PoolFullError` (the
server answers 503), instead of piling up requests, memory and latency. A slot is freed
when its job really ends, not when its request gives up: a timed-out request cancels its
job if it is still queued, but a running job keeps its slot until it returns, so the bound
is true of the threads' actual work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class PoolFullError(RuntimeError):
    """Every worker is busy and the queue is full."""


class BoundedPool:
    """``await pool.run(fn, *args)`` runs ``fn`` in a worker thread, or raises PoolFullError."""

    def __init__(self, workers: int, queue: int, name: str = "dermkit-decode"):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._taken = 0

    @property
    def capacity(self) -> int:
        return self.workers + self.queue

    @property
    def taken(self) -> int:
        """Jobs running or queued now."""
        return self._taken

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._taken -= 1

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """Queue ``fn(*args)``; raises :class:`PoolFullError` when no slot is free."""
        with self._lock:
            if self._taken >= self.capacity:
                raise PoolFullError(
                    f"the server is busy ({self.workers} decoding, {self.queue} waiting)"
                )
            self._taken += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    async def run(self, fn: Callable[..., T], *args) -> T:
        future = self.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # frees the slot now if the job had not started
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
