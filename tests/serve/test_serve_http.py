"""The HTTP contract over a stand-in runner: readiness, 429 with Retry-After, client disconnects, timeouts,
clear 4xx answers, metrics. (tests/serve/test_serve_model.py runs the real tiny model.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from llada_edge.errors import InputError
from llada_edge.serve.app import create_app
from llada_edge.serve.config import ServeConfig


def config(tmp_path: Path, **options) -> ServeConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    return ServeConfig(str(tmp_path / "model"), **options)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        head, _, rest = key.partition("{")
        if head == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0


def test_health_is_503_until_the_engines_load_and_requests_wait_for_it(tmp_path, runner_type, serving) -> None:
    release = threading.Event()

    def load():
        release.wait(10)
        return runner_type(blocks=1, delay=0)

    app = create_app(config(tmp_path), load)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "loading"}
        busy = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["status"] == "ready"
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "x"


def test_a_failed_load_says_why(tmp_path) -> None:
    def load():
        raise FileNotFoundError("manifest.json")

    from fastapi.testclient import TestClient

    with TestClient(create_app(config(tmp_path), load)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/health")
        assert health.status_code == 503 and "FileNotFoundError: manifest.json" in health.json()["error"]


def test_every_request_is_answered_200_or_429_with_retry_after(tmp_path, runner_type, serving) -> None:
    runner = runner_type(blocks=5, delay=0.04)
    app = create_app(config(tmp_path, queue_size=2), lambda: runner)
    with serving(app) as url:
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def send(i: int) -> None:
            response = httpx.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"r{i}"}]}, timeout=30)
            with lock:
                answers.append(response)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(r.status_code for r in answers)
        assert len(answers) == 8 and set(codes) <= {200, 429} and codes.count(200) >= 3 and 429 in codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "server_busy"
            else:
                assert r.json()["choices"][0]["message"]["content"].startswith("r")
        assert metric(url, "llada_edge_requests_total", task="chat", outcome="ok") == codes.count(200)
        assert metric(url, "llada_edge_requests_total", task="chat", outcome="busy") == codes.count(429)
        assert runner.ended.count("done") == codes.count(200)


def test_a_client_that_goes_away_cancels_its_request(tmp_path, runner_type, serving) -> None:
    runner = runner_type(blocks=100, delay=0.05)  # 5 s if nobody stops it
    app = create_app(config(tmp_path), lambda: runner)
    with serving(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                       timeout=0.4)
        deadline = time.monotonic() + 5
        while not runner.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.ended == ["RequestCancelled"]
        assert metric(url, "llada_edge_requests_total", task="chat", outcome="cancelled") == 1
        runner.blocks = 1  # the worker is free for the next request
        ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "y"}]})
        assert ok.status_code == 200


def test_a_stream_closed_early_cancels_its_request(tmp_path, runner_type, serving) -> None:
    runner = runner_type(blocks=100, delay=0.05)
    app = create_app(config(tmp_path), lambda: runner)
    with serving(app) as url:
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            progress = [line for line in (next(lines) for _ in range(6)) if "progress" in line]
            assert progress  # block progress arrives while the request runs
        deadline = time.monotonic() + 5
        while not runner.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.ended == ["RequestCancelled"]


def test_the_timeout_answers_504(tmp_path, runner_type, serving) -> None:
    runner = runner_type(blocks=100, delay=0.02)
    app = create_app(config(tmp_path, timeout=0.3), lambda: runner)
    with serving(app) as url:
        answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert answer.status_code == 504 and "timeout of 0.3 s" in answer.json()["error"]["message"]
        assert runner.ended == ["RequestTimedOut"]


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/v1/chat/completions", {"messages": []}, 400, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0.9}, 400,
     "top_p: Extra inputs are not permitted"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "threshold": 2}, 400,
     "threshold must be in [0, 1]"),
    ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, 400,
     "size '100x64': width and height must be positive multiples of 32"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size must be 'WIDTHxHEIGHT'"),
    ("/v1/images/generations", {"prompt": "x", "n": 2}, 400, "n: Input should be less than or equal to 1"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64", "response_format": "path"}, 400,
     "needs a server started with --output-dir"),
    ("/v1/images/generations", {"prompt": "x", "decode_steps": 100000}, 400, "decode_steps must be"),
])
def test_bad_bodies_get_400_naming_the_field(tmp_path, runner_type, path, body, status, says) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(config(tmp_path), lambda: runner_type(blocks=1, delay=0))) as client:
        assert _ready(client)
        answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text
        assert says in answer.json()["error"]["message"]
        assert "bad_request" in client.get("/metrics").text


def _ready(client) -> bool:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_images_are_read_only_from_allowed_folders(tmp_path, runner_type) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    Image.new("RGB", (64, 64)).save(secret / "s.png")
    (allowed / "link.png").symlink_to(secret / "s.png")

    def ask(url: str, **cfg) -> httpx.Response:
        with TestClient(create_app(config(tmp_path, **cfg), lambda: runner_type(blocks=1, delay=0))) as client:
            assert _ready(client)
            return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}]})

    no_dirs = ask(str(secret / "s.png"))
    assert no_dirs.status_code == 403 and "reads no files" in no_dirs.json()["error"]["message"]
    for sneaky in (str(secret / "s.png"), f"{allowed}/../secret/s.png", f"file://{allowed}/link.png", "s.png"):
        answer = ask(sneaky, image_dirs=(str(allowed),))
        assert answer.status_code == 403, sneaky
        assert "not inside a folder this server may read" in answer.json()["error"]["message"]
    remote = ask("https://example.com/cat.png", image_dirs=(str(allowed),))
    assert remote.status_code == 400 and "fetches nothing" in remote.json()["error"]["message"]
    garbage = ask("data:image/png;base64,aGVsbG8=")
    assert garbage.status_code == 400 and "not an image" in garbage.json()["error"]["message"]


def test_edits_need_an_image_part(tmp_path, runner_type) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(config(tmp_path), lambda: runner_type(blocks=1, delay=0))) as client:
        assert _ready(client)
        missing = client.post("/v1/images/edits", data={"prompt": "blue"})
        assert missing.status_code == 400 and "a file part named 'image'" in missing.json()["error"]["message"]
        mask = client.post("/v1/images/edits", data={"prompt": "blue", "mask": "x"},
                           files={"image": ("a.png", b"not a png", "image/png")})
        assert mask.status_code == 400 and "mask: Extra inputs are not permitted" in mask.json()["error"]["message"]
        junk = client.post("/v1/images/edits", data={"prompt": "blue"},
                           files={"image": ("a.png", b"not a png", "image/png")})
        assert junk.status_code == 400 and "not an image" in junk.json()["error"]["message"]


def test_workers_share_the_cpus(tmp_path, monkeypatch) -> None:
    """Without --threads, each worker's ONNX Runtime sessions get the process's CPUs divided among the workers
    (each session would otherwise take one thread per core, and N workers would oversubscribe the machine)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert config(tmp_path, workers=3).worker_threads == 2
    assert config(tmp_path, workers=16).worker_threads == 1
    assert config(tmp_path, workers=3, threads=5).worker_threads == 5
    with pytest.raises(InputError, match="threads must be >= 1"):
        config(tmp_path, threads=0)
