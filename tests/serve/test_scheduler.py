"""The queue: bounded, nothing dropped silently, cancellation and deadlines stop a job at a progress report."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from llada_edge.runtime.requests import ChatRequest
from llada_edge.serve.scheduler import QueueFull, RequestCancelled, RequestTimedOut, Scheduler


def chat(text: str = "hi") -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}])


def started(runner: Any, capacity: int = 1, workers: int = 1) -> Scheduler:
    scheduler = Scheduler(lambda: runner, workers, capacity)
    scheduler.start()
    assert scheduler.wait_ready(10)
    return scheduler


def test_a_full_queue_refuses_with_a_retry_hint_and_runs_the_rest(runner_type) -> None:
    runner = runner_type(blocks=4, delay=0.05)
    scheduler = started(runner, capacity=1)
    try:
        running = scheduler.submit(chat("a"), timeout=10)
        while scheduler.busy == 0:
            time.sleep(0.005)
        waiting = scheduler.submit(chat("b"), timeout=10)
        with pytest.raises(QueueFull) as refused:
            scheduler.submit(chat("c"), timeout=10)
        assert refused.value.retry_after >= 1 and "1 requests are already waiting" in str(refused.value)
        assert running.future.result(5).text == "a" and waiting.future.result(5).text == "b"
        assert runner.ended == ["done", "done"]
    finally:
        scheduler.close()


def test_cancel_while_waiting_never_runs_and_while_running_stops_at_the_next_block(runner_type) -> None:
    runner = runner_type(blocks=20, delay=0.05)
    scheduler = started(runner, capacity=2)
    try:
        running = scheduler.submit(chat("a"), timeout=30)
        waiting = scheduler.submit(chat("b"), timeout=30)
        while scheduler.busy == 0:
            time.sleep(0.005)
        waiting.cancel()
        time.sleep(0.1)
        running.cancel()
        with pytest.raises(RequestCancelled):
            running.future.result(5)
        assert waiting.future.cancelled()
        after = scheduler.submit(chat("c"), timeout=30)  # the worker is free again
        assert after.future.result(5).text == "c"
        assert runner.ended == ["RequestCancelled", "done"]  # "b" never started
    finally:
        scheduler.close()


def test_a_deadline_stops_a_running_job_and_expires_a_waiting_one(runner_type) -> None:
    runner = runner_type(blocks=40, delay=0.05)
    scheduler = started(runner, capacity=2)
    try:
        slow = scheduler.submit(chat("slow"), timeout=0.3)
        queued = scheduler.submit(chat("queued"), timeout=0.2)
        with pytest.raises(RequestTimedOut, match=r"timeout of 0\.3 s"):
            slow.future.result(5)
        with pytest.raises(RequestTimedOut):
            queued.future.result(5)
        assert runner.ended == ["RequestTimedOut"]  # the queued job expired before it started
    finally:
        scheduler.close()


def test_workers_each_load_their_own_runner_and_share_the_queue(runner_type) -> None:
    runners: list[Any] = []
    lock = threading.Lock()

    def load() -> Any:
        with lock:
            runners.append(runner_type(blocks=3, delay=0.05))
            return runners[-1]

    scheduler = Scheduler(load, workers=2, capacity=4)
    scheduler.start()
    try:
        assert scheduler.wait_ready(10)
        jobs = [scheduler.submit(chat(str(i)), timeout=10) for i in range(6)]
        assert [job.future.result(10).text for job in jobs] == [str(i) for i in range(6)]
        assert len(runners) == 2 and all(runner.ended for runner in runners)  # both workers ran jobs
    finally:
        scheduler.close()


def test_a_load_failure_is_reported_not_hung() -> None:
    def load() -> Any:
        raise FileNotFoundError("build/engines-tiny/manifest.json")

    scheduler = Scheduler(load, workers=1, capacity=1)
    scheduler.start()
    assert not scheduler.wait_ready(10)
    assert isinstance(scheduler.load_error, FileNotFoundError)
    scheduler.close()
