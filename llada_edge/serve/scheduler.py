"""Requests to pipelines: a bounded queue, one worker thread per pipeline, deadlines and cancellation.

A :class:`~llada_edge.runtime.Pipeline` runs one request at a time (its backend holds one KV cache), so each
worker thread owns its own pipeline, loaded by that thread, and takes the oldest waiting job. What the queue
promises:

* nothing is dropped silently: :meth:`Scheduler.submit` either queues the job or raises :class:`QueueFull`
  (the server answers 429 with its ``retry_after``);
* a job whose client went away, or whose deadline passed, stops at the next progress report of the pipeline (one
  per block of tokens, one per decoder step) with :class:`RequestCancelled` / :class:`RequestTimedOut`, and a
  job cancelled while it waits never starts;
* requests do not see each other: a pipeline's result depends only on its request (the seed is part of it), so a
  request answered under load equals the same request run alone.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from llada_edge.runtime.requests import Request

Listener = Callable[[str, int, int], None]  # (stage, done, total), called on the worker thread


class Runner(Protocol):
    """What a worker drives: :class:`~llada_edge.runtime.Pipeline` (tests use stand-ins)."""

    progress: Listener | None

    def run(self, request: Request) -> Any: ...


class QueueFull(Exception):
    """Every worker is busy and the queue holds ``capacity`` waiting jobs."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"the server is busy: {capacity} requests are already waiting; retry in {retry_after} s")


class RequestCancelled(Exception):
    """The client went away; the job stopped at its next progress report (or never started)."""


class RequestTimedOut(Exception):
    """The job's deadline passed, waiting or running."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request did not finish within the server's timeout of {timeout:g} s")


@dataclass(eq=False)
class Job:
    request: Request
    timeout: float  # seconds from submission, queueing included
    listener: Listener | None = None
    future: Future[Any] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the job: at once if it waits, at the pipeline's next progress report if it runs."""
        self._cancelled.set()
        self.future.cancel()  # succeeds only while the job waits

    def checkpoint(self, stage: str, done: int, total: int) -> None:
        """The pipeline's progress callback while this job runs: where it stops when cancelled or late."""
        if self.cancelled:
            raise RequestCancelled("the client went away")
        if time.monotonic() > self.deadline:
            raise RequestTimedOut(self.timeout)
        if self.listener is not None:
            self.listener(stage, done, total)


class Scheduler:
    """``workers`` threads, each loading its own runner with ``load()`` and running one job at a time from a
    queue of at most ``capacity`` waiting jobs."""

    def __init__(self, load: Callable[[], Runner], workers: int = 1, capacity: int = 8) -> None:
        if workers < 1 or capacity < 0:
            raise ValueError(f"workers must be >= 1 and capacity >= 0, got {workers} and {capacity}")
        self.workers = workers
        self.capacity = capacity
        self._load = load
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._loaded = 0
        self._running = 0
        self._closing = False
        self._service_seconds = 0.0  # moving average of a job's run time: the basis of Retry-After
        self.load_error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; each loads its runner first (see :attr:`ready`)."""
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"llada-edge-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def ready(self) -> bool:
        """True once every worker has loaded its runner."""
        with self._cond:
            return self._loaded == self.workers and self.load_error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._loaded == self.workers or self.load_error is not None, timeout)
        return self.ready

    def close(self) -> None:
        """Cancel what waits, let running jobs stop at their next progress report, and join the workers."""
        with self._cond:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.cancel()
        for thread in self._threads:
            thread.join(timeout=30)

    # -- jobs -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting (not running)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> int:
        """Jobs running."""
        with self._cond:
            return self._running

    def submit(self, request: Request, timeout: float, listener: Listener | None = None) -> Job:
        """Queue a request; raises :class:`QueueFull` when every worker is busy and the queue is full."""
        job = Job(request, timeout, listener)
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shutting down")
            idle = self.workers - self._running if self._loaded == self.workers else 0
            if len(self._queue) >= self.capacity + idle:
                raise QueueFull(self.capacity, self._retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one average run per worker round, at least 1."""
        return max(1, math.ceil(self._service_seconds * (len(self._queue) + 1) / self.workers))

    def _next(self) -> Job | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closing)
            if self._closing:
                return None
            job = self._queue.popleft()
            self._running += 1
            return job

    def _work(self) -> None:
        try:
            runner = self._load()
        except BaseException as exc:  # reported by /health; the worker never serves
            with self._cond:
                self.load_error = exc
                self._cond.notify_all()
            return
        with self._cond:
            self._loaded += 1
            self._cond.notify_all()
        while (job := self._next()) is not None:
            try:
                self._run(runner, job)
            finally:
                with self._cond:
                    self._running -= 1

    def _run(self, runner: Runner, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while waiting
        if time.monotonic() > job.deadline:
            job.future.set_exception(RequestTimedOut(job.timeout))
            return
        job.started = time.monotonic()
        runner.progress = job.checkpoint
        try:
            result = runner.run(job.request)
        except BaseException as exc:  # the request's own failure (bad input, cancel, a bug): its answer
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            runner.progress = None
            ran = time.monotonic() - job.started
            with self._cond:
                self._service_seconds = ran if self._service_seconds == 0 else 0.8 * self._service_seconds + 0.2 * ran
