"""The HTTP server: OpenAI's Images API over one warm Pipeline (FastAPI; a thin shell).

Every request becomes one Pipeline.submit, so all clients share the continuous-batching
scheduler. The event loop never waits on the model: it awaits the request's Future (polling for a
client that left, which cancels the request so its rows are freed at the next AR step) or, when
streaming, the progress events the scheduler thread hands over. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, the param naming the body field at fault; every
error (a route that does not exist, a body too large or too slow, a bug) has that shape and is
counted in bitdance_errors_total.

The routes are here; the error shape is errors.py, the settings and admission state.py, and the
outermost layer (key, body size and time limits) guard.py. Their names stay importable from here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BitDanceError
from ..runtime.params import ParamError
from .errors import SHOWN_CHARS, ApiError, _cut, _describe, _quoted, error_body  # noqa: F401
from .guard import POLL_S, _as_json, _Guard, _send_json, log  # noqa: F401
from .schema import ImageRequest
from .state import ServerSettings, ServerState
from .translate import HTTP_FIELDS, FieldError, Job, to_job


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def make_app(
    pipeline=None,
    settings: ServerSettings | None = None,
    loader: Callable[[], object] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app over `pipeline` (a loaded Pipeline, left open at shutdown), or over what `loader()`
    returns, loaded on a thread at start-up (closed at shutdown; /health answers 503 until then)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)
    if pipeline is not None:
        state.ready(pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = None
        if loader is not None:

            def load() -> None:
                try:
                    state.ready(loader())
                except BaseException as exc:  # the server reports it on /health, then exits
                    state.load_error = exc
                    if on_load_error is not None:
                        on_load_error(exc)

            thread = threading.Thread(target=load, name="bitdance-load", daemon=True)
            thread.start()
        yield
        state.draining = True
        if thread is not None and not thread.is_alive() and state.pipeline is not None:
            await asyncio.to_thread(state.pipeline.close)  # (stopped while loading: nothing to drain; the
            # loader is a daemon thread and ends with the process, its cache writes being temp + rename)

    app = FastAPI(title="bitdance-rt", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return state.refuse(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method, ...
        kind = "not_found" if exc.status_code == 404 else ("internal" if exc.status_code >= 500 else "bad_request")
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {_cut(request.url.path)} (see /docs)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("allow", (exc.headers or {}).get("Allow", "?"))
            message = f"{request.method} is not allowed on {_cut(request.url.path)} (allowed: {allowed})"
        elif exc.status_code == 400 and "parsing the body" in message:  # json.loads refused it (huge integers)
            message = "the body is not valid JSON"
        return state.refuse(ApiError(exc.status_code, message, kind, code=kind, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        param, message = _describe(exc.errors())
        return state.refuse(ApiError(400, message, "bad_request", param, "invalid_value"))

    @app.get("/health")
    async def health():
        if state.pipeline is not None and not state.draining:
            pipe = state.pipeline
            return {
                "status": "ok",
                "model": pipe.config.name,
                "backend": pipe.backend.name,
                "queued": pipe.queued,
                "rows_in_flight": pipe.rows_in_flight,
            }
        status = "draining" if state.draining else ("failed" if state.load_error else "loading")
        body = {"status": status}
        if state.load_error is not None:
            body["error"] = str(state.load_error)
        return JSONResponse(body, 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():  # not admission-controlled: it costs nothing, whatever the queue
        pipe = state.pipeline
        if pipe is None:
            state.admit()  # the 503 that says why
        return {
            "object": "list",
            "data": [{"id": pipe.config.name, "object": "model", "created": 0, "owned_by": "bitdance-rt"}],
        }

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        began = time.monotonic()
        pipe = state.admit()
        try:
            job = to_job(body, pipe, settings.max_images)
        except FieldError as exc:
            kind = "not_found" if exc.status == 404 else "bad_request"
            raise ApiError(exc.status, str(exc), kind, exc.param, exc.code) from None
        if body.stream:
            return StreamingResponse(
                _stream(state, pipe, job, began), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        future = _submit(pipe, job)
        output = await _wait(state, pipe, future, request, began)
        data = await asyncio.to_thread(lambda: [{"b64_json": _png_b64(im)} for im in output.images])
        seconds = time.monotonic() - began
        state.took(seconds)
        state.metrics.answered(job.images, seconds, stream=False)
        state.metrics.first_image_seconds.observe(seconds)
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": job.size, "seed": job.seed}

    return app


def _submit(pipe, job: Job, **extra):
    try:
        return pipe.submit(**job.submit, **extra)
    except ParamError as exc:  # the Pipeline's own check (runtime/params.py), named as the body names it
        raise ApiError(400, str(exc), "bad_request", HTTP_FIELDS.get(exc.param, exc.param), "invalid_value") from None
    except BitDanceError as exc:  # what the Pipeline refuses that translate.py did not foresee
        raise ApiError(400, str(exc), "bad_request", code="invalid_value") from None


async def _wait(state: ServerState, pipe, future, request: Request, began: float):
    """The request's Output; cancels it when the client leaves or its time is up."""
    waiting = asyncio.wrap_future(future)
    deadline = began + state.settings.request_timeout
    while True:
        try:
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
        except asyncio.CancelledError:  # shutdown ran out of time: free the rows, or closing waits for them
            pipe.cancel(future)
            raise
        if done:
            break
        if await request.is_disconnected():
            pipe.cancel(future)
            raise _Gone()
        if time.monotonic() >= deadline:
            pipe.cancel(future)
            raise ApiError(
                504,
                f"the request took longer than {state.settings.request_timeout:g} s "
                "(--request-timeout); it was cancelled",
                "timeout",
            )
    exc = waiting.exception()
    if exc is not None:
        raise ApiError(500, f"generation failed: {exc}", "internal", code="generation_failed") from exc
    return waiting.result()


class _Gone(ApiError):
    """The client left: nobody reads the answer (its kind is counted once, as disconnected)."""

    def __init__(self):
        super().__init__(499, "client disconnected", "disconnected")


async def _stream(state: ServerState, pipe, job: Job, began: float):
    """Server-sent events as OpenAI's Images API streams them: partial images, then one
    image_generation.completed per image, then [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731 (scheduler thread)
    extra = {"preview_every": job.previews, "on_progress": put} if job.previews else {}
    try:
        future = _submit(pipe, job, **extra)
    except ApiError as exc:
        state.metrics.error(exc.kind)
        yield _sse("error", {"type": "error", **error_body(str(exc), exc.status, exc.param, exc.code)})
        return
    future.add_done_callback(put)
    common = {"size": job.size, "quality": "auto", "background": "opaque", "output_format": "png"}
    partial, first, finished, remaining = 0, True, False, 1.0
    try:
        while True:
            remaining = began + state.settings.request_timeout - time.monotonic()
            try:
                item = await asyncio.wait_for(events.get(), timeout=max(0.0, remaining))
            except asyncio.TimeoutError:
                state.metrics.error("timeout")
                message = f"the request took longer than {state.settings.request_timeout:g} s; it was cancelled"
                yield _sse("error", {"type": "error", **error_body(message, 504, None, "timeout")})
                return
            if item is future:
                break
            if item.preview is None:  # a step without a partial image
                continue
            previews = item.preview if isinstance(item.preview, list) else [item.preview]
            encoded = await asyncio.to_thread(lambda: [_png_b64(p) for p in previews])
            if first:
                state.metrics.first_image_seconds.observe(time.monotonic() - began)
                first = False
            for image_index, b64 in enumerate(encoded):
                yield _sse(
                    "image_generation.partial_image",
                    {
                        "type": "image_generation.partial_image",
                        "b64_json": b64,
                        "created_at": int(time.time()),
                        "partial_image_index": partial,
                        "image_index": image_index,
                        "step": item.step,
                        "total_steps": item.total,
                        **common,
                    },
                )
            partial += 1
        finished = True
        exc = future.exception()
        if exc is not None:
            state.metrics.error("internal")
            yield _sse(
                "error", {"type": "error", **error_body(f"generation failed: {exc}", 500, None, "generation_failed")}
            )
            return
        output = future.result()
        encoded = await asyncio.to_thread(lambda: [_png_b64(im) for im in output.images])
        if first:
            state.metrics.first_image_seconds.observe(time.monotonic() - began)
        usage = {
            "input_tokens": 0,
            "output_tokens": int(output.tokens.shape[1]) * len(encoded),
            "total_tokens": int(output.tokens.shape[1]) * len(encoded),
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        }
        for image_index, b64 in enumerate(encoded):
            yield _sse(
                "image_generation.completed",
                {
                    "type": "image_generation.completed",
                    "b64_json": b64,
                    "created_at": int(time.time()),
                    "image_index": image_index,
                    "seed": job.seed,
                    "usage": usage,
                    **common,
                },
            )
        yield "data: [DONE]\n\n"
        seconds = time.monotonic() - began
        state.took(seconds)
        state.metrics.answered(job.images, seconds, stream=True)
    finally:
        if not finished and not future.done():  # the client left (or the time ran out): free the rows
            pipe.cancel(future)
            if remaining > 0:
                state.metrics.error("disconnected")
