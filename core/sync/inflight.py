"""Several batches in flight per worker, settled in the order they were sent.

Sending is what waits (a round trip to the destination, then the checkpoint's group
commit); building batches and settling their results mutate state that only the caller's
thread touches. So sends run on a small thread pool and their results come back to the
caller, oldest first. The window bounds the sends under way (a send is done once its
checkpoint is written, so a crash re-sends at most the window); finished sends behind a
slow one wait for it to be settled in order, up to `_BACKLOG` windows of them, rather
than holding the window's places.

The window is AIMD, as TCP's is: it starts at the destination's maximum, halves when a
batch met a 429, shrinks by one when a batch waited for our own pacer (more batches in
flight than the shared budget lets go: a fan-out worker needs only its share), and grows
by one after a window's worth of batches with neither. With a
maximum of 1 the send runs inline, exactly as a sequential sender would.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class AimdWindow:
    """How many batches may be in flight: halved on a rate limit, -1 when held back by
    our pacer, +1 per clean window."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("the window's maximum must be at least 1")
        self.maximum = maximum
        self.limit = maximum
        self._clean = 0

    def observe(self, rate_limited: bool, held_back: bool = False) -> None:
        if rate_limited:
            self.limit = max(1, self.limit // 2)
            self._clean = 0
            return
        if held_back:  # more would only wait longer for the pacer: do not grow
            self._clean = 0
            return
        self._clean += 1
        if self._clean >= self.limit:
            self.limit = min(self.maximum, self.limit + 1)
            self._clean = 0


_BACKLOG = 4
"""Finished sends kept waiting behind an unfinished one, in windows."""


class InFlight(Generic[T, R]):
    """Jobs tagged with `T` whose results `R` come back in submission order."""

    def __init__(self, maximum: int, *, name: str = "send") -> None:
        self.window = AimdWindow(maximum)
        self._pool = ThreadPoolExecutor(maximum, thread_name_prefix=name) if maximum > 1 else None
        self._queue: deque[tuple[T, Future[R]]] = deque()
        self._changed = threading.Condition()
        self._running = 0

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, tag: T, job: Callable[[], R]) -> list[tuple[T, R]]:
        """Start `job` once the window has room; returns the jobs finished meanwhile,
        oldest first (never one before an older one that is still under way)."""
        finished: list[tuple[T, R]] = []
        if self._pool is None:
            future: Future[R] = Future()
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
            self._queue.append((tag, future))
            return [self._pop()]
        while True:
            while self._queue and self._queue[0][1].done():
                finished.append(self._pop())
            if len(self._queue) >= _BACKLOG * self.window.maximum:
                finished.append(self._pop())  # waits for the oldest
                continue
            with self._changed:
                if self._running < self.window.limit:
                    self._running += 1
                    break
                self._changed.wait()
        self._queue.append((tag, self._pool.submit(self._counted, job)))
        return finished

    def _counted(self, job: Callable[[], R]) -> R:
        try:
            return job()
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def drain(self) -> Iterator[tuple[T, R]]:
        """Every job still in flight, oldest first."""
        while self._queue:
            yield self._pop()

    def _pop(self) -> tuple[T, R]:
        tag, future = self._queue.popleft()
        try:
            return tag, future.result()
        except BaseException:
            self.close()  # nothing keeps sending once the run is failing
            raise

    def close(self) -> None:
        """Wait for the jobs still running (their results are dropped) and stop the pool.
        A job that finished is checkpointed by itself; only the caller's settling is lost,
        and a re-run settles it from the checkpoint."""
        futures = [future for _, future in self._queue]
        self._queue.clear()
        if futures:
            wait(futures)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
