"""The HTTP server: OpenAI's Images API over one warm Pipeline (FastAPI; a thin shell).

Every request becomes one Pipeline.submit, so all clients share the continuous-batching
scheduler. The event loop never waits on the model: it awaits the request's Future (polling for a
client that left, which cancels the request so its rows are freed at the next AR step) or, when
streaming, the progress events the scheduler thread hands over. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, the param naming the body field at fault; every
error (a route that does not exist, a body too large or too slow, a bug) has that shape and is
counted in bitdance_errors_total.

The outermost layer (_Guard) checks the key before a byte of the body is read, on every route but
/health (/docs, /redoc and /openapi.json included: with a key they need it too), and reads the body
whole, bounded in size and time, before FastAPI parses it: nobody without the key can make the
server hold or parse a body, and no client can hold a request open by sending slowly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BitDanceError
from ..runtime.params import ParamError
from .metrics import Metrics
from .schema import ImageRequest
from .translate import FieldError, Job, to_job

POLL_S = 0.1  # how often a waiting request checks that its client is still there
SHOWN_CHARS = 100  # most characters of a bad value quoted back in an error message
# Pipeline argument (ParamError.param) -> the body field it comes from
HTTP_FIELDS = {"cfg": "guidance_scale", "num_images": "n", "preview_every": "partial_images"}

log = logging.getLogger("bitdance_rt.serve")


@dataclass
class ServerSettings:
    """What `bitdance-rt serve` takes besides the model: admission, time and access limits."""

    max_queue: int = 64  # requests waiting for cache rows before new ones get 429
    request_timeout: float = 600.0  # seconds from arrival to the last image; then 504 and the rows are freed
    max_images: int = 16  # images per request (n x labels)
    api_key: str | None = None  # bearer token for every route but /health
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight before cancelling them
    body_timeout: float = 10.0  # seconds a client may take to send a request's headers, and then its body
    max_body_bytes: int = 1 << 20  # larger bodies get 413 (a request body is a few hundred bytes)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code or kind, headers


def error_body(message: str, status: int, param: str | None, code: str | None) -> dict:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ServerState:
    """The Pipeline (None while it loads), readiness, draining, and the recent request time that
    Retry-After is estimated from."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.pipeline = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.metrics = Metrics(lambda: self.pipeline)
        self._seconds = 1.0  # moving mean of request seconds

    def ready(self, pipe) -> None:
        self.pipeline = pipe
        pipe.scheduler.observers.append(self.metrics.observe_step)
        self.metrics.ready.set(1)

    def admit(self):
        """The Pipeline, if a new request may join the queue now; else the 503 / 429 to answer."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "draining", headers={"Retry-After": "5"})
        pipe = self.pipeline
        if pipe is None:
            what = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, what, "loading", headers={"Retry-After": "5"})
        # Only requests that the free cache rows cannot take count: a burst that merely waits for the next
        # AR step boundary is no backlog (with --max-queue 0, any backlog refuses).
        backlog = pipe.backlog
        if backlog > 0 and backlog >= self.settings.max_queue:
            wait = max(1, min(60, math.ceil(self._seconds)))
            raise ApiError(429, f"{backlog} requests are waiting for cache rows (the limit is "
                                f"{self.settings.max_queue}); retry after {wait} s", "queue_full",
                           headers={"Retry-After": str(wait)})
        return pipe

    def took(self, seconds: float) -> None:
        self._seconds = 0.8 * self._seconds + 0.2 * seconds

    def refuse(self, exc: ApiError) -> JSONResponse:
        """The error's answer, counted."""
        self.metrics.error(exc.kind)
        return JSONResponse(error_body(str(exc), exc.status, exc.param, exc.code), exc.status, headers=exc.headers)


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def make_app(pipeline=None, settings: ServerSettings | None = None, loader: Callable[[], object] | None = None,
             on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
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
            return {"status": "ok", "model": pipe.config.name, "backend": pipe.backend.name,
                    "queued": pipe.queued, "rows_in_flight": pipe.rows_in_flight}
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
        return {"object": "list", "data": [{"id": pipe.config.name, "object": "model", "created": 0,
                                            "owned_by": "bitdance-rt"}]}

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
            return StreamingResponse(_stream(state, pipe, job, began), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        future = _submit(pipe, job)
        output = await _wait(state, pipe, future, request, began)
        data = await asyncio.to_thread(lambda: [{"b64_json": _png_b64(im)} for im in output.images])
        seconds = time.monotonic() - began
        state.took(seconds)
        state.metrics.answered(job.images, seconds, stream=False)
        state.metrics.first_image_seconds.observe(seconds)
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": job.size,
                "seed": job.seed}

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
            raise ApiError(504, f"the request took longer than {state.settings.request_timeout:g} s "
                                "(--request-timeout); it was cancelled", "timeout")
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
                yield _sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": b64, "created_at": int(time.time()),
                    "partial_image_index": partial, "image_index": image_index, "step": item.step,
                    "total_steps": item.total, **common})
            partial += 1
        finished = True
        exc = future.exception()
        if exc is not None:
            state.metrics.error("internal")
            yield _sse("error", {"type": "error", **error_body(f"generation failed: {exc}", 500, None,
                                                               "generation_failed")})
            return
        output = future.result()
        encoded = await asyncio.to_thread(lambda: [_png_b64(im) for im in output.images])
        if first:
            state.metrics.first_image_seconds.observe(time.monotonic() - began)
        usage = {"input_tokens": 0, "output_tokens": int(output.tokens.shape[1]) * len(encoded),
                 "total_tokens": int(output.tokens.shape[1]) * len(encoded),
                 "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
        for image_index, b64 in enumerate(encoded):
            yield _sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()),
                "image_index": image_index, "seed": job.seed, "usage": usage, **common})
        yield "data: [DONE]\n\n"
        seconds = time.monotonic() - began
        state.took(seconds)
        state.metrics.answered(job.images, seconds, stream=True)
    finally:
        if not finished and not future.done():  # the client left (or the time ran out): free the rows
            pipe.cancel(future)
            if remaining > 0:
                state.metrics.error("disconnected")


def _describe(errors) -> tuple[str | None, str]:
    """The first pydantic error as (field, message), quoting at most SHOWN_CHARS of the value."""
    if not errors:
        return None, "invalid request"
    e = errors[0]
    loc = [_cut(str(p)) for p in e.get("loc", ()) if p != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return None, f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON"
    if kind == "missing" and not loc:
        return None, "the body must be a JSON object with the request's fields (it was empty)"
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return None, "the body must be a JSON object with the request's fields"
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        return param, f"unknown field {param!r} (see the API's fields: prompt, n, size, response_format, model, " \
                      "stream, partial_images, seed, steps, guidance_scale, cfg_schedule, labels)"
    where = ".".join(loc[:1] + [p for p in loc[1:] if p not in ("str", "int")])  # (not the Union member tried)
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_quoted(got)})"
    return param, f"{where}: {e.get('msg', 'invalid value')}{shown}"


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _quoted(value) -> str:
    """`value` as JSON, at most SHOWN_CHARS characters (a long string or list is cut before it is
    encoded, so a large value costs no more than a small one)."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        value = value[:SHOWN_CHARS]
    elif isinstance(value, (list, tuple)) and len(value) > SHOWN_CHARS // 2:
        value = list(value[:SHOWN_CHARS // 2])
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return _cut(text)


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class _Guard:
    """Pure ASGI, outermost of the app's own layers (inside it, FastAPI). In order: the API key
    (every route but /health; nothing of the body is read without it); a Content-Length over
    max_body_bytes (413, nothing read); the body, read whole within body_timeout (408) and
    max_body_bytes (413, for bodies without a length); then the app, handed the body as JSON
    whatever the Content-Type said (curl -d sends form-urlencoded; every body here is JSON).
    Any exception the app did not answer becomes a JSON 500, counted as kind "internal", and the
    connection stays usable. 408 and 413 close the connection: the rest of the body is not read.
    A body that stalls once SIGTERM came is answered 503 at once: shutdown waits for work, not uploads."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            body = await self._body(scope, receive)
            if body is None:  # the client left while sending
                return
            delivered = False

            async def replay():
                nonlocal delivered
                if delivered:
                    return await receive()  # (then http.disconnect, when the client leaves)
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(_as_json(scope), replay, tracked)
        except ApiError as exc:
            self.state.metrics.error(exc.kind)
            if not started:
                await _send_json(send, exc.status, error_body(str(exc), exc.status, exc.param, exc.code),
                                 exc.headers)
        except Exception as exc:  # a bug: answered like any error, logged with its traceback
            log.error("bitdance-rt serve: %s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            self.state.metrics.error("internal")
            if not started:
                await _send_json(send, 500, error_body(
                    f"internal server error ({type(exc).__name__}); the server's log has the details", 500, None,
                    "internal_error"))

    async def _body(self, scope, receive) -> bytes | None:
        """The request's body, once the key is checked; None when the client left."""
        settings = self.state.settings
        headers = dict(scope.get("headers") or ())
        if settings.api_key and scope.get("path") != "/health":
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                         settings.api_key.encode()):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               "unauthorized", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        limit = settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", "too_large",
                             code="request_too_large", headers={"Connection": "close"})
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > limit:
            raise too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout
        chunks, size = [], 0
        while True:
            left = deadline - loop.time()
            try:  # (waits of POLL_S at most: a stalled upload must not hold a shutdown for the body timeout)
                message = await asyncio.wait_for(receive(), timeout=max(0.0, min(left, POLL_S)))
            except asyncio.TimeoutError:
                if left <= POLL_S:
                    raise ApiError(408, f"the request body did not arrive within {settings.body_timeout:g} s "
                                        "(--body-timeout)", "body_timeout", code="request_timeout",
                                   headers={"Connection": "close"}) from None
                if self.state.draining:
                    raise ApiError(503, "the server is shutting down", "draining",
                                   headers={"Connection": "close", "Retry-After": "5"}) from None
                continue
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _as_json(scope) -> dict:
    """`scope` with Content-Type: application/json (the only body this API takes)."""
    headers = scope.get("headers") or []
    kinds = [v for k, v in headers if k == b"content-type"]
    if kinds and kinds[0].split(b";")[0].strip().lower() == b"application/json":
        return scope
    return {**scope, "headers": [(k, v) for k, v in headers if k != b"content-type"]
                                + [(b"content-type", b"application/json")]}
