"""The app on Ray Serve with two local replicas, started as a user starts it (`llada-edge serve --ray`): both
replicas answer, a replica killed mid-request costs that request a 5xx and nothing else, Ray brings it back, and
Ctrl-C takes the whole Ray instance down. Plus the cluster config file that `--write-config` writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from llada_edge.serve.ray_app import replica_pids

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "seed": 1}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def busiest(pids: list[int]) -> int:
    """The replica computing right now: the one whose process used CPU over a short window."""
    import psutil

    procs = [psutil.Process(pid) for pid in pids]
    for proc in procs:
        proc.cpu_percent()
    time.sleep(0.3)
    return max(procs, key=lambda proc: proc.cpu_percent()).pid


def test_two_replicas_survive_a_killed_one(tiny_build: Path, loopback_port) -> None:
    port = loopback_port()
    url = f"http://127.0.0.1:{port}"
    # SIGINT ignored, as in a background job of a non-interactive shell (CI): `serve --ray` must still stop on it.
    # Its own session, so that a failure can take down every process it started.
    server = subprocess.Popen([sys.executable, "-m", "llada_edge.cli", "serve", "--ray", "--replicas", "2",
                               "--model", str(tiny_build), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until(lambda: healthy(url) and len(replica_pids()) == 2, 180, "two replicas ready")
        before = replica_pids()
        first = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=120)
        assert first.status_code == 200, first.text

        # A long request (a 1024x1024 image on the tiny build: seconds), then its replica is killed under it.
        answers: dict[str, httpx.Response] = {}
        long_request = threading.Thread(target=lambda: answers.setdefault("long", httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "a cat", "size": "1024x1024"}, timeout=120)))
        long_request.start()
        time.sleep(1.0)
        victim = busiest(before)
        os.kill(victim, signal.SIGKILL)
        long_request.join(timeout=120)
        assert 500 <= answers["long"].status_code < 600

        # The other replica keeps answering at once; Ray starts a replacement for the killed one.
        for _ in range(4):
            again = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=120)
            assert again.status_code == 200, again.text
            assert again.json()["choices"] == first.json()["choices"]  # same seed, same text, any replica
        wait_until(lambda: len(replica_pids()) == 2 and victim not in replica_pids(), 120, "a replacement")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # Ray's processes too: nothing left for the next test
            output = f"still running 120 s after SIGINT: {server.communicate()[0][-3000:]}"
    assert server.returncode == 0, output
    assert replica_pids() == [], "Ctrl-C leaves no replica behind"


def test_write_config(tiny_build: Path, tmp_path: Path) -> None:
    from llada_edge.cli import main
    from llada_edge.serve.ray_app import app_builder

    target = tmp_path / "serve.yaml"
    assert main(["serve", "--model", str(tiny_build), "--write-config", str(target), "--replicas", "3",
                 "--replica-gpus", "1", "--replica-cpus", "4", "--workers", "2", "--port", "9000"]) == 0
    document = json.loads(target.read_text())  # YAML is a superset of JSON: `serve deploy` reads it as written
    assert document["http_options"] == {"host": "127.0.0.1", "port": 9000}
    (application,) = document["applications"]
    args = application["args"]
    assert application["import_path"] == "llada_edge.serve.ray_app:app_builder"
    assert (args["model"], args["replicas"], args["num_gpus"], args["workers"]) == (str(tiny_build), 3, 1.0, 2)
    bound = app_builder(args)  # what `serve deploy` calls: the args build the deployment as the CLI would
    assert bound._bound_deployment.num_replicas == 3
    assert bound._bound_deployment.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 1.0}
    (replica_config,) = bound._bound_deployment.init_args
    assert replica_config["threads"] == 2  # each worker's ONNX Runtime threads: the replica's 4 CPUs over 2 workers
