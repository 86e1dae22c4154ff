"""Load and fault test of ``llada-edge serve`` on loopback, bounded in count and time.

    python benchmarks/serve_load.py --model build/engines-tiny [--out benchmarks/results] [--skip-ray] [--smoke]

One run, the same mixed requests (chat, understanding of an image sent as a data URL, text-to-image) each time:

* **direct**: through the Python API in this process (``Pipeline.run``, one request after another): the floor;
* **server**: ``llada-edge serve`` (one process, ``--workers`` engine sessions) with ``--concurrency`` clients;
* **ray**: ``llada-edge serve --ray --replicas 2`` (one worker each) with the same clients;
* **burst** (and **ray_burst**): 4x the capacity (workers + queue, per replica) sent at once: every request gets 200
  or 429 with ``Retry-After``, none is lost;
* **fault** (Ray): a long image request, its replica killed with SIGKILL mid-request, chats sent meanwhile: the
  killed request gets a 5xx, every other one a 200, Ray brings a replacement up (seconds reported);
* **soak**: ``--soak`` chat requests against the single server, its RSS sampled every ``--soak / 10``: growth from
  the first sample after warm-up to the last.

A request "lost" is one with no HTTP answer (connection error or timeout); the report counts them. Writes
``<out>/serve_load.json`` and ``serve_load.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench import percentile

Body = tuple[str, dict[str, Any]]  # (endpoint path, JSON body)
CHAT_PATH, IMAGES_PATH = "/v1/chat/completions", "/v1/images/generations"
RUNS = ("direct", "server", "ray", "burst", "ray_burst", "soak")  # the report's rows


@dataclass(frozen=True)
class Outcome:
    task: str
    status: int  # 0: no HTTP answer (lost)
    seconds: float


def image_data_url() -> str:
    from PIL import Image

    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mixed_bodies(count: int, image: str, t2i_size: str) -> list[Body]:
    """chat, understand, t2i in turn; request i has seed i."""
    bodies: list[Body] = []
    for i in range(count):
        if i % 3 == 0:
            bodies.append((CHAT_PATH, {"messages": [{"role": "user", "content": f"Tell me about {i}"}],
                                       "max_tokens": 32, "seed": i}))
        elif i % 3 == 1:
            parts = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]
            bodies.append((CHAT_PATH, {"messages": [{"role": "user", "content": parts}], "max_tokens": 16,
                                       "seed": i}))
        else:
            bodies.append((IMAGES_PATH, {"prompt": f"a lighthouse, take {i}", "size": t2i_size, "seed": i}))
    return bodies


def task_name(body: Body) -> str:
    path, payload = body
    if path == IMAGES_PATH:
        return "t2i"
    content = payload["messages"][-1]["content"]
    return "chat" if isinstance(content, str) else "understand"


def run_direct(model: str, bodies: list[Body]) -> tuple[list[Outcome], float]:
    """The same requests through ``Pipeline.run``, converted by the server's own schemas."""
    from llada_edge.runtime import Pipeline
    from llada_edge.serve.schemas import ChatCompletionRequest, ImageGenerationRequest

    pipe = Pipeline.load(model)
    outcomes = []
    start = time.perf_counter()
    for path, payload in bodies:
        request = (ChatCompletionRequest.model_validate(payload).to_request(readable=[]) if path == CHAT_PATH
                   else ImageGenerationRequest.model_validate(payload).to_request())
        began = time.perf_counter()
        pipe.run(request)
        outcomes.append(Outcome(task_name((path, payload)), 200, time.perf_counter() - began))
    return outcomes, time.perf_counter() - start


def send(client: httpx.Client, url: str, body: Body) -> Outcome:
    began = time.perf_counter()
    try:
        status = client.post(url + body[0], json=body[1]).status_code
    except httpx.TransportError:
        status = 0
    return Outcome(task_name(body), status, time.perf_counter() - began)


def run_load(url: str, bodies: list[Body], concurrency: int) -> tuple[list[Outcome], float]:
    """``concurrency`` clients working through ``bodies``; each request answered or counted lost."""
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(lambda body: send(client, url, body), bodies))
        return outcomes, time.perf_counter() - start


def summary(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    ok = [o.seconds for o in outcomes if o.status == 200]
    statuses = Counter(o.status for o in outcomes)
    per_task = {task: round(percentile([o.seconds for o in outcomes if o.task == task and o.status == 200], 50), 3)
                for task in sorted({o.task for o in outcomes})}
    return {"requests": len(outcomes), "status": {str(k): v for k, v in sorted(statuses.items())},
            "lost": statuses.get(0, 0), "p50_s": round(percentile(ok, 50), 3), "p95_s": round(percentile(ok, 95), 3),
            "p50_s_by_task": per_task, "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 3) if wall > 0 else float("nan")}


@contextmanager
def server(model: str, port: int, extra: list[str], ready: Callable[[], bool]) -> Iterator[subprocess.Popen[str]]:
    """``llada-edge serve`` as a subprocess, until ``ready()``; Ctrl-C (SIGINT) at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "llada_edge.cli", "serve", "--model", model, "--port", str(port),
                             "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {proc.communicate()[0][-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # with --ray: Ray's processes too
            proc.communicate()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and its children (the server's worker threads live in the process itself)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def run_burst(url: str, bodies: list[Body]) -> dict[str, Any]:
    """All at once: the bounded queue answers the excess with 429 + Retry-After, nothing unanswered."""
    retry_after: list[str] = []

    def one(client: httpx.Client, body: Body) -> Outcome:
        began = time.perf_counter()
        try:
            answer = client.post(url + body[0], json=body[1])
        except httpx.TransportError:
            return Outcome(task_name(body), 0, time.perf_counter() - began)
        if answer.status_code == 429:
            retry_after.append(answer.headers.get("retry-after", ""))
        return Outcome(task_name(body), answer.status_code, time.perf_counter() - began)

    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=len(bodies))) as client, \
            ThreadPoolExecutor(len(bodies)) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(lambda body: one(client, body), bodies))
        wall = time.perf_counter() - start
    result = summary(outcomes, wall)
    result["retry_after_present"] = all(value.isdigit() for value in retry_after)
    return result


def run_soak(url: str, pid: int, count: int) -> dict[str, Any]:
    """``count`` chats two at a time; RSS sampled 10 times. Growth: last sample vs the first after warm-up."""
    body: Body = (CHAT_PATH, {"messages": [{"role": "user", "content": "How are you?"}], "max_tokens": 32})
    every = max(1, count // 10)
    samples, outcomes = [], []
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        for done in range(0, count, every):
            batch = min(every, count - done)
            outcomes += list(pool.map(lambda _i: send(client, url, body), range(batch)))
            samples.append(tree_rss_bytes(pid))
        wall = time.perf_counter() - start
    warm = samples[1] if len(samples) > 1 else samples[0]
    return {**summary(outcomes, wall), "rss_mb": [round(s / 2**20, 1) for s in samples],
            "rss_growth_mb": round((samples[-1] - warm) / 2**20, 1),
            "rss_growth_fraction": round((samples[-1] - warm) / warm, 4)}


def run_fault(url: str, image_size: str, chats: int) -> dict[str, Any]:
    """Kill the replica serving a long image request; chats sent meanwhile and after must all succeed."""
    import psutil

    from llada_edge.serve.ray_app import replica_pids

    before = replica_pids()
    outcomes: dict[str, Outcome] = {}
    with httpx.Client(timeout=300) as client:
        long_body: Body = (IMAGES_PATH, {"prompt": "a long one", "size": image_size, "seed": 1})
        worker = threading.Thread(target=lambda: outcomes.setdefault("killed", send(client, url, long_body)))
        worker.start()
        time.sleep(1.0)
        procs = [psutil.Process(pid) for pid in before]
        for proc in procs:
            proc.cpu_percent()
        time.sleep(0.3)
        victim = max(procs, key=lambda proc: proc.cpu_percent()).pid
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        chat: Body = (CHAT_PATH, {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 16})
        during = [send(client, url, chat) for _ in range(chats)]
        worker.join()
        while len(replica_pids()) < len(before) or victim in replica_pids():
            if time.perf_counter() - killed_at > 180:
                break
            time.sleep(0.2)
        recovered_s = time.perf_counter() - killed_at
        after = [send(client, url, chat) for _ in range(chats)]
    return {"killed_request_status": outcomes["killed"].status, "replicas_before": len(before),
            "during": summary(during, 1.0)["status"], "after": summary(after, 1.0)["status"],
            "replacement_up_s": round(recovered_s, 1), "replicas_after": len(replica_pids())}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    image = image_data_url()
    bodies = mixed_bodies(args.requests, image, args.t2i_size)
    report: dict[str, Any] = {"model": args.model, "requests": args.requests, "concurrency": args.concurrency,
                              "workers": args.workers, "queue_size": args.queue_size, "cpus": os.cpu_count()}
    print(f"direct: {len(bodies)} requests through the Python API", file=sys.stderr)
    report["direct"] = summary(*run_direct(args.model, bodies))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    single = ["--workers", str(args.workers), "--queue-size", str(args.queue_size)]
    with server(args.model, port, single, lambda: healthy(url)) as proc:
        print(f"server: {len(bodies)} requests, {args.concurrency} clients", file=sys.stderr)
        report["server"] = summary(*run_load(url, bodies, args.concurrency))
        capacity = args.workers + args.queue_size
        print(f"burst: {4 * capacity} at once", file=sys.stderr)
        report["burst"] = run_burst(url, mixed_bodies(4 * capacity, image, args.t2i_size))
        print(f"soak: {args.soak} chats", file=sys.stderr)
        report["soak"] = run_soak(url, proc.pid, args.soak)

    if not args.skip_ray:
        from llada_edge.serve.ray_app import replica_pids

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ray = ["--ray", "--replicas", "2", "--workers", "1", "--queue-size", str(args.queue_size)]
        with server(args.model, port, ray, lambda: healthy(url) and len(replica_pids()) == 2):
            print(f"ray: {len(bodies)} requests, {args.concurrency} clients, 2 replicas", file=sys.stderr)
            report["ray"] = summary(*run_load(url, bodies, args.concurrency))
            capacity = 2 * (1 + args.queue_size)
            print(f"ray burst: {4 * capacity} at once", file=sys.stderr)
            report["ray_burst"] = run_burst(url, mixed_bodies(4 * capacity, image, args.t2i_size))
            print("fault: a replica killed mid-request", file=sys.stderr)
            report["fault"] = run_fault(url, args.fault_size, chats=4)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = ["# llada-edge serve: load and fault test", "",
             f"Model `{report['model']}`, {report['requests']} mixed requests (chat, understand, t2i), "
             f"{report['concurrency']} concurrent clients, {report['cpus']} CPUs; single server "
             f"{report['workers']} workers, queue {report['queue_size']}.", "",
             "| run | requests | answers (status: count) | lost | p50 s | p95 s | p50 s chat / understand / t2i "
             "| throughput req/s |", "|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        if name in report:
            row = report[name]
            tasks = " / ".join(str(row["p50_s_by_task"].get(t, "-")) for t in ("chat", "understand", "t2i"))
            answers = ", ".join(f"{k}: {v}" for k, v in row["status"].items())
            lines.append(f"| {name} | {row['requests']} | {answers} | {row['lost']} | {row['p50_s']} | "
                         f"{row['p95_s']} | {tasks} | {row['throughput_rps']} |")
    soak = report["soak"]
    lines += ["", f"Soak RSS (MB, every {max(1, soak['requests'] // 10)} requests): {soak['rss_mb']}; growth after "
              f"warm-up {soak['rss_growth_mb']} MB ({100 * soak['rss_growth_fraction']:.2f}%)."]
    if "fault" in report:
        fault = report["fault"]
        lines += ["", f"Fault: replica killed (SIGKILL) mid-request -> that request answered "
                  f"{fault['killed_request_status']}; requests during the outage {fault['during']}, after "
                  f"{fault['after']}; replacement replica up {fault['replacement_up_s']} s after the kill "
                  f"({fault['replicas_after']}/{fault['replicas_before']} replicas)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a build folder (or checkpoint) that `serve` can load")
    parser.add_argument("--out", default="benchmarks/results", help="folder for serve_load.json and .md")
    parser.add_argument("--requests", type=int, default=48, help="mixed requests per run (default 48)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="single server's workers (default 2)")
    parser.add_argument("--queue-size", type=int, default=4, help="queue size of each server (default 4)")
    parser.add_argument("--soak", type=int, default=200, help="chat requests of the soak (default 200)")
    parser.add_argument("--t2i-size", default="128x128", help="image size of the t2i requests (default 128x128)")
    parser.add_argument("--fault-size", default="1024x1024",
                        help="image size of the request whose replica is killed: long enough to be mid-request")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray runs (ray and fault)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: the report's shape, not figures")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.soak, args.t2i_size = 6, 10, "64x64"
    report = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serve_load.md").write_text(markdown(report))
    print(markdown(report))
    lost = sum(report[name]["lost"] for name in RUNS if name in report)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
