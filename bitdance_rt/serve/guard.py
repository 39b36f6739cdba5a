"""The outermost layer of the app (_Guard, pure ASGI): access and body limits before FastAPI runs.

It checks the key before a byte of the body is read, on every route but /health (/docs, /redoc and
/openapi.json included: with a key they need it too), and reads the body whole, bounded in size and
time, before FastAPI parses it: nobody without the key can make the server hold or parse a body, and
no client can hold a request open by sending slowly. Any error it sees has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from .errors import ApiError, error_body
from .state import ServerState

POLL_S = 0.1  # how often a waiting request checks that its client is still there

log = logging.getLogger("bitdance_rt.serve")


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
                await _send_json(send, exc.status, error_body(str(exc), exc.status, exc.param, exc.code), exc.headers)
        except Exception as exc:  # a bug: answered like any error, logged with its traceback
            log.error("bitdance-rt serve: %s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            self.state.metrics.error("internal")
            if not started:
                await _send_json(
                    send,
                    500,
                    error_body(
                        f"internal server error ({type(exc).__name__}); the server's log has the details",
                        500,
                        None,
                        "internal_error",
                    ),
                )

    async def _body(self, scope, receive) -> bytes | None:
        """The request's body, once the key is checked; None when the client left."""
        settings = self.state.settings
        headers = dict(scope.get("headers") or ())
        if settings.api_key and scope.get("path") != "/health":
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), settings.api_key.encode()
            ):
                raise ApiError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    "unauthorized",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        limit = settings.max_body_bytes
        too_large = ApiError(
            413,
            f"the request body is larger than {limit} bytes (--max-body-bytes)",
            "too_large",
            code="request_too_large",
            headers={"Connection": "close"},
        )
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
                    raise ApiError(
                        408,
                        f"the request body did not arrive within {settings.body_timeout:g} s (--body-timeout)",
                        "body_timeout",
                        code="request_timeout",
                        headers={"Connection": "close"},
                    ) from None
                if self.state.draining:
                    raise ApiError(
                        503,
                        "the server is shutting down",
                        "draining",
                        headers={"Connection": "close", "Retry-After": "5"},
                    ) from None
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
    return {
        **scope,
        "headers": [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")],
    }
