"""The server on the real tiny build (ONNX Runtime): every endpoint, OpenAI's own client, no cross-talk between
concurrent requests, and `llada-edge serve` started as a command."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from llada_edge.runtime import Pipeline
from llada_edge.runtime.requests import ChatRequest, TextOptions
from llada_edge.serve.app import create_app
from llada_edge.serve.config import ServeConfig


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    pixels = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    return folder / "photo.png"


@pytest.fixture(scope="module")
def served(tiny_build: Path, photo: Path, tmp_path_factory, serving):
    """One server (2 workers) over the tiny build for the module; yields (url, output folder)."""
    out = tmp_path_factory.mktemp("served")
    config = ServeConfig(str(tiny_build), workers=2, queue_size=8, image_dirs=(str(photo.parent),),
                         output_dir=str(out))
    with serving(create_app(config)) as url:
        yield url, out


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat(url: str, text: str, **options) -> dict:
    answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                                                             **options}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_chat_and_understanding(served, photo) -> None:
    url, _ = served
    reply = chat(url, "Hello there", max_tokens=32, seed=1)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < reply["usage"]["completion_tokens"] <= 32 and reply["usage"]["prompt_tokens"] > 0
    assert reply["llada_edge"]["forward_passes"] > 0
    for image in (data_url(photo), str(photo), photo.as_uri()):
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={"max_tokens": 16, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What is in the picture?"}]}]})
        assert answer.status_code == 200, answer.text
        assert "tokenizer" in answer.json()["llada_edge"]["timings"]  # the image went through the tokenizer


def test_image_generation_and_edit(served, photo) -> None:
    url, out = served
    made = httpx.post(f"{url}/v1/images/generations", timeout=120,
                      json={"prompt": "a red square", "size": "96x64", "seed": 3})
    assert made.status_code == 200, made.text
    image = Image.open(io.BytesIO(base64.b64decode(made.json()["data"][0]["b64_json"])))
    assert image.size == (96, 64) and made.json()["llada_edge"]["grid"] == [2, 3]
    as_path = httpx.post(f"{url}/v1/images/generations", timeout=120,
                         json={"prompt": "a red square", "size": "96x64", "seed": 3, "response_format": "path"})
    written = Path(as_path.json()["data"][0]["path"])
    assert written.parent == out.resolve() and Image.open(written).tobytes() == image.tobytes()  # same seed
    edited = httpx.post(f"{url}/v1/images/edits", timeout=120, files={"image": photo.read_bytes()},
                        data={"prompt": "make it blue", "seed": "2", "source_size": "64", "steps": "4"})
    assert edited.status_code == 200, edited.text
    edit = edited.json()["llada_edge"]
    # The answer is the image the pipeline made: its size matches the reported grid (32 pixels per token).
    written = Image.open(io.BytesIO(base64.b64decode(edited.json()["data"][0]["b64_json"])))
    assert list(written.size) == edit["size"] and edit["grid"] == [edit["size"][1] // 32, edit["size"][0] // 32]


def test_concurrent_requests_equal_lone_runs(served, tiny_build) -> None:
    """Same seed -> same answer, whatever else runs at the same time (two workers, six requests)."""
    url, _ = served
    pipe = Pipeline.load(tiny_build)
    prompts = [(f"tell me about number {i}", i) for i in range(6)]
    lone = [pipe.run(ChatRequest([{"role": "user", "content": p}], TextOptions(max_new_tokens=32, temperature=1.0,
                                                                              seed=s))).text for p, s in prompts]
    got: dict[int, str] = {}

    def send(i: int) -> None:
        prompt, seed = prompts[i]
        got[i] = chat(url, prompt, max_tokens=32, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [got[i] for i in range(len(prompts))] == lone
    assert len(set(lone)) > 1  # the seeds matter: equality is not vacuous


def test_streaming_reports_progress_then_the_same_text(served) -> None:
    url, _ = served
    body = {"messages": [{"role": "user", "content": "Count with me"}], "max_tokens": 64, "seed": 5,
            "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    progress = [c["llada_edge"]["progress"] for c in chunks if "progress" in c.get("llada_edge", {})]
    total = progress[-1]["total"]
    assert total >= 2 and [p["done"] for p in progress] == list(range(1, total + 1))  # one report per block
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == chat(url, "Count with me", max_tokens=64, seed=5)["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client(served) -> None:
    openai = pytest.importorskip("openai")
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=16, seed=1)
    assert reply.choices[0].message.content == chat(url, "Hi", max_tokens=16, seed=1)["choices"][0]["message"][
        "content"]
    image = client.images.generate(model="tiny", prompt="a cat", size="64x64", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json))).size == (64, 64)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=16, seed=1, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="multiples of 32"):
        client.images.generate(model="tiny", prompt="a cat", size="65x64")


def test_serve_command_starts_answers_and_stops(tiny_build: Path, capsys, loopback_port) -> None:
    from llada_edge.cli import main

    assert main(["serve", "--model", str(tiny_build / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    port = loopback_port()
    server = subprocess.Popen([sys.executable, "-m", "llada_edge.cli", "serve", "--model", str(tiny_build),
                               "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        assert chat(url, "Hello", max_tokens=16)["usage"]["completion_tokens"] > 0
        assert 'llada_edge_requests_total{outcome="ok",task="chat"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output
