"""The ASGI app: OpenAI-style endpoints over a :class:`~llada_edge.serve.scheduler.Scheduler` of pipelines.

* ``POST /v1/chat/completions``: chat (text messages) or understanding (one user message with an image and a
  question); ``stream: true`` sends server-sent events: block progress, then the text, then ``[DONE]``;
* ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart: ``image`` and the fields);
* ``GET /health`` (200 once every worker has loaded its engines, 503 before), ``GET /metrics`` (Prometheus),
  ``GET /v1/models``.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param"}}``): 400 for a bad body (which field, what was
expected: the runtime's own limits), 403 for a file outside the allowed folders, 429 with ``Retry-After`` when
the queue is full, 499 when the client went away, 504 past the timeout, 503 while loading, 500 for a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from llada_edge.errors import LladaEdgeError
from llada_edge.runtime.requests import ChatRequest, EditRequest, T2IRequest, UnderstandRequest
from llada_edge.runtime.requests import Request as PipelineRequest
from llada_edge.serve.config import ServeConfig
from llada_edge.serve.files import MAX_IMAGE_BYTES, Forbidden, decode_image_bytes, encode_png, write_output
from llada_edge.serve.metrics import ServerMetrics
from llada_edge.serve.scheduler import Job, QueueFull, RequestCancelled, RequestTimedOut, Runner, Scheduler
from llada_edge.serve.schemas import ChatCompletionRequest, ImageEditForm, ImageGenerationRequest

# The task an endpoint's errors count under when they happen before the request is known (a bad body).
ROUTE_TASKS = {"/v1/chat/completions": "chat", "/v1/images/generations": "t2i", "/v1/images/edits": "edit"}
POLL_SECONDS = 0.1  # how often a waiting request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request" (the client never sees it)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.counted = False  # in the metrics already (by Server.run)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def task_of(request: PipelineRequest) -> str:
    if isinstance(request, UnderstandRequest):
        return "understand"
    if isinstance(request, ChatRequest):
        return "chat"
    return "t2i" if isinstance(request, T2IRequest) else "edit"


def _as_api_error(exc: BaseException) -> tuple[ApiError, str]:
    """The HTTP answer to an exception raised while preparing or running a request, and its metrics outcome."""
    if isinstance(exc, ApiError):
        return exc, "bad_request"
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "server_busy", headers={"Retry-After": str(exc.retry_after)}), "busy"
    if isinstance(exc, RequestTimedOut):
        return ApiError(504, str(exc), "timeout"), "timeout"
    if isinstance(exc, RequestCancelled):
        return ApiError(CLIENT_CLOSED, str(exc), "cancelled"), "cancelled"
    if isinstance(exc, Forbidden):
        return ApiError(403, str(exc), "permission_error", exc.key), "bad_request"
    if isinstance(exc, LladaEdgeError):  # bad input, or a task this build cannot run (missing graphs)
        return ApiError(400, str(exc), "invalid_request_error", exc.key), "bad_request"
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"), "error"


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    """``field.path: what was expected`` for each problem, in one line."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return "; ".join(problems)


def default_loader(config: ServeConfig) -> Callable[[], Runner]:
    def load() -> Runner:
        from llada_edge.runtime import BackendOptions, Pipeline

        return Pipeline.load(config.model, backend=config.backend,
                             options=BackendOptions(precision=config.precision, device=config.device,
                                                    threads=config.worker_threads))

    return load


class Server:
    """The state behind the routes: config, scheduler, metrics."""

    def __init__(self, config: ServeConfig, load: Callable[[], Runner] | None = None) -> None:
        self.config = config
        self.scheduler = Scheduler(load or default_loader(config), config.workers, config.queue_size)
        self.metrics = ServerMetrics(lambda: self.scheduler.depth, lambda: self.scheduler.busy)

    async def run(self, request: PipelineRequest, http: Request) -> Any:
        """Queue ``request``, wait for its result while the client is there, and count the outcome."""
        task, start = task_of(request), time.monotonic()
        job: Job | None = None
        try:
            job = self.scheduler.submit(request, self.config.timeout)
            result = await self._wait(job, http)
        except asyncio.CancelledError:  # this handler itself was cancelled (shutdown): stop the job too
            if job is not None:
                job.cancel()
            self.metrics.answered(task, "cancelled", time.monotonic() - start)
            raise
        except Exception as exc:
            error, outcome = _as_api_error(exc)
            self.metrics.answered(task, outcome, time.monotonic() - start)
            error.counted = True
            raise error from exc
        self.finished(task, job, result, start)
        return result

    def finished(self, task: str, job: Job, result: Any, start: float) -> None:
        self.metrics.answered(task, "ok", time.monotonic() - start)
        self.metrics.ran(task, result, (job.started or job.submitted) - job.submitted)

    async def _wait(self, job: Job, http: Request) -> Any:
        future = asyncio.wrap_future(job.future)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if abandoned
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
            if done:
                if future.cancelled():  # scheduler.close() cancelled the waiting job
                    raise ApiError(503, "the server shut down before the request ran", "unavailable")
                return future.result()
            if await http.is_disconnected():
                job.cancel()
                raise RequestCancelled("the client went away")

    def health(self) -> JSONResponse:
        scheduler = self.scheduler
        if scheduler.load_error is not None:
            error = scheduler.load_error
            return JSONResponse({"status": "failed", "error": f"{type(error).__name__}: {error}"}, status_code=503)
        if not scheduler.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": self.config.name, "workers": scheduler.workers,
                             "queue_depth": scheduler.depth, "running": scheduler.busy})

    def require_ready(self) -> None:
        if not self.scheduler.ready:
            failed = self.scheduler.load_error
            message = f"the engines failed to load: {failed}" if failed else "the engines are still loading"
            raise ApiError(503, message, "unavailable", headers={"Retry-After": "5"})


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------


def _extras(result: Any) -> dict[str, Any]:
    """What llada-edge adds to an OpenAI-shaped answer: timings, forward passes, steps."""
    return {"timings": result.timings, "forward_passes": result.forward_passes, "steps": result.steps}


def _usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def chat_response(result: Any, model: str) -> dict[str, Any]:
    finish = "stop" if result.stop_token is not None else "length"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}],
        "usage": _usage(result),
        "llada_edge": _extras(result),
    }


def image_response(result: Any, response_format: str, config: ServeConfig) -> dict[str, Any]:
    if response_format == "b64_json":
        item: dict[str, Any] = {"b64_json": encode_png(result.image)}
    else:
        assert config.output is not None  # check_output refused the request before it ran
        path = write_output(result.image, config.output)
        item = {"url": path.as_uri(), "path": str(path)}
    extras = {**_extras(result), "grid": list(result.grid), "size": list(result.image.size)}
    if result.thinking is not None:
        item["revised_prompt"] = result.thinking  # thinking mode: the model's reasoning before the image
    return {"created": int(time.time()), "data": [item], "llada_edge": extras}


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _chunk(ident: str, model: str, delta: dict[str, Any], finish: str | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def create_app(config: ServeConfig, load: Callable[[], Runner] | None = None) -> FastAPI:
    """The app for one server (or one Ray Serve replica); ``load`` makes a worker's pipeline (default: the
    configured model and backend)."""
    server = Server(config, load)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()  # workers load their engines in the background; /health says when ready
        yield
        server.scheduler.close()

    app = FastAPI(title="llada-edge", summary="LLaDA2.0-Uni: OpenAI-style chat, understanding, images",
                  lifespan=lifespan)
    app.state.server = server

    def answer(request: Request, error: ApiError) -> JSONResponse:
        task = ROUTE_TASKS.get(request.url.path)
        if task is not None and not error.counted:  # refused before it reached the queue
            server.metrics.answered(task, "unavailable" if error.status == 503 else "bad_request", 0.0)
        return error.response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, ApiError(400, _validation_message(exc), "invalid_request_error"))

    async def prepare(build: Callable[[], PipelineRequest]) -> PipelineRequest:
        """Validate and read a request's inputs off the event loop (images may be large); errors are 4xx."""
        server.require_ready()
        try:
            return await asyncio.to_thread(build)
        except ValidationError as exc:
            raise ApiError(400, _validation_message(exc), "invalid_request_error") from exc
        except LladaEdgeError as exc:
            raise _as_api_error(exc)[0] from exc

    def check_output(response_format: str) -> None:
        """Before any work: a file answer needs the folder the server may write to."""
        if response_format != "b64_json" and config.output is None:
            raise ApiError(400, f"response_format {response_format!r} needs a server started with --output-dir",
                           "invalid_request_error", "response_format")

    @app.get("/health")
    async def health() -> JSONResponse:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.name, "object": "model", "owned_by": "llada-edge"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> dict[str, Any] | StreamingResponse:
        request = await prepare(lambda: body.to_request(config.readable))
        if body.stream:
            return _stream_chat(server, request, http)
        result = await server.run(request, http)
        return chat_response(result, config.name)

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, http: Request) -> dict[str, Any]:
        check_output(body.response_format)
        request = await prepare(body.to_request)
        result = await server.run(request, http)
        return await asyncio.to_thread(image_response, result, body.response_format, config)

    @app.post("/v1/images/edits")
    async def images_edits(http: Request) -> dict[str, Any]:
        server.require_ready()
        form = await http.form()
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "image: a file part named 'image' is required (multipart/form-data)",
                           "invalid_request_error", "image")
        if upload.size is not None and upload.size > MAX_IMAGE_BYTES:
            raise ApiError(400, f"image: {upload.size:,} bytes, more than the limit of {MAX_IMAGE_BYTES:,}",
                           "invalid_request_error", "image")
        data = await upload.read()
        fields = {key: value for key, value in form.multi_items() if key != "image"}
        try:
            body = ImageEditForm.model_validate(fields)
        except ValidationError as exc:
            raise ApiError(400, _validation_message(exc), "invalid_request_error") from exc
        check_output(body.response_format)
        request: EditRequest = await prepare(lambda: body.to_request(decode_image_bytes(data, "image")))  # type: ignore[assignment]
        result = await server.run(request, http)
        return await asyncio.to_thread(image_response, result, body.response_format, config)

    return app


def _stream_chat(server: Server, request: PipelineRequest, http: Request) -> StreamingResponse:
    """Server-sent events: one chunk per block of tokens (``llada_edge.progress``), then the text, then
    ``[DONE]``. A diffusion model finishes a block at once, not a token at a time, so the text comes whole."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
    task, start = task_of(request), time.monotonic()

    def listener(stage: str, done: int, total: int) -> None:  # on the worker thread
        loop.call_soon_threadsafe(updates.put_nowait, (stage, done, total))

    try:
        job = server.scheduler.submit(request, server.config.timeout, listener)
    except QueueFull as exc:
        error, outcome = _as_api_error(exc)
        server.metrics.answered(task, outcome, time.monotonic() - start)
        error.counted = True
        raise error from exc
    ident, model = f"chatcmpl-{uuid.uuid4().hex}", server.config.name
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            yield _sse(_chunk(ident, model, {"role": "assistant", "content": ""}))
            while not future.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    stage, count, total = getter.result()
                    yield _sse(_chunk(ident, model, {}, llada_edge={"progress": {
                        "stage": stage, "done": count, "total": total}}))
                else:
                    getter.cancel()
            try:
                if future.cancelled():
                    raise ApiError(503, "the server shut down before the request ran", "unavailable")
                result = future.result()
            except Exception as exc:
                error, outcome = _as_api_error(exc)
                server.metrics.answered(task, outcome, time.monotonic() - start)
                yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.status}})
                finished = True
                return
            server.finished(task, job, result, start)
            finished = True
            reason = "stop" if result.stop_token is not None else "length"
            yield _sse(_chunk(ident, model, {"content": result.text}))
            yield _sse(_chunk(ident, model, {}, reason, usage=_usage(result), llada_edge=_extras(result)))
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away mid-stream
                job.cancel()
                server.metrics.answered(task, "cancelled", time.monotonic() - start)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
