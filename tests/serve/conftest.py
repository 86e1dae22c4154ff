"""The server under test: a stand-in runner for the queue's behaviour, uvicorn on a loopback port for real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from llada_edge.runtime.pipeline import TextResult
from llada_edge.runtime.requests import ChatRequest


class SlowRunner:
    """Stands in for a Pipeline: ``blocks`` progress reports ``delay`` seconds apart, then a chat result whose
    text is the request's last message. Records how each run ended."""

    def __init__(self, blocks: int = 5, delay: float = 0.05) -> None:
        self.blocks, self.delay = blocks, delay
        self.progress: Any = None
        self.ended: list[str] = []  # "done" or the exception's class name

    def run(self, request: Any) -> TextResult:
        assert isinstance(request, ChatRequest)
        try:
            for block in range(self.blocks):
                time.sleep(self.delay)
                if self.progress is not None:
                    self.progress("chat", block + 1, self.blocks)
        except BaseException as exc:
            self.ended.append(type(exc).__name__)
            raise
        self.ended.append("done")
        text = request.messages[-1]["content"]
        return TextResult(text, [1, 2, 3], {"backbone": 0.1, "total": 0.1}, self.blocks, self.blocks, 0, [], 7)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def live_server(app: Any, ready_timeout: float = 120.0) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 in a thread; yields the base URL once /health says ready."""
    import httpx

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {url} was not ready within {ready_timeout} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="session")
def runner_type() -> type[SlowRunner]:
    return SlowRunner


@pytest.fixture(scope="session")
def serving() -> Any:
    """``live_server`` (a context manager) for tests: conftest helpers are reached through fixtures."""
    return live_server


@pytest.fixture(scope="session")
def loopback_port() -> Any:
    """``free_port``: a function returning an unused port on 127.0.0.1."""
    return free_port
