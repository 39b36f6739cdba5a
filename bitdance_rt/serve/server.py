"""Run the app with uvicorn: bind, load the model on a thread (/health says when it is ready),
and on SIGTERM / SIGINT stop admitting, finish the requests in flight (for at most
--shutdown-timeout seconds), close the Pipeline, exit.

No connection can hold the server: a client gets --body-timeout seconds to send a request's
headers (this module's protocol: closed, with a 408 when some of them came) and then as long
again for its body (app._Guard: 408); an idle connection is closed at shutdown at once.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BitDanceError
from .app import ServerSettings, error_body, make_app

log = logging.getLogger("bitdance_rt.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app the moment a shutdown signal arrives: from then on
    /health answers 503 (load balancers stop sending) while uvicorn lets open requests finish."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig, frame) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def _late_headers_protocol(timeout: float, on_timeout: Callable[[], None]) -> type:
    """uvicorn's h11 protocol with a deadline on a request's headers, which uvicorn has not (its
    keep-alive timer starts only after a first response, and stops at the next byte): from the
    connection's start, and from the first byte of each later request, to the end of its headers."""

    class LateHeadersProtocol(H11Protocol):
        _headers_due = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._headers_due = self.loop.call_later(timeout, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            receiving = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            if self.conn.their_state is not h11.IDLE:
                self._stop()  # the headers are in; the body's deadline is app._Guard's
            elif receiving and self._headers_due is None:
                self._headers_due = self.loop.call_later(timeout, self._headers_late)

        def connection_lost(self, exc) -> None:
            self._stop()
            super().connection_lost(exc)

        def _stop(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None

        def _headers_late(self) -> None:
            self._headers_due = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why it ends (h11 cannot send it
                # before a request's headers, so it is written as is)
                on_timeout()
                raw = json.dumps(
                    error_body(
                        f"the request's headers did not arrive within {timeout:g} s (--body-timeout)",
                        408,
                        None,
                        "request_timeout",
                    )
                ).encode()
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(raw), raw)
                )
            self.transport.close()

    return LateHeadersProtocol


def uvicorn_server(app, settings: ServerSettings, host: str, port: int, log_level: str = "info") -> _DrainingServer:
    """The uvicorn server `serve` runs (the tests run it too): header deadlines, and a graceful
    shutdown bounded by settings.shutdown_timeout."""
    state = app.state.server
    protocol = _late_headers_protocol(settings.body_timeout, lambda: state.metrics.error("body_timeout"))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    return _DrainingServer(config, state)


def listen(host: str, port: int) -> socket.socket:
    """The bound listening socket, before anything else starts: a port that cannot be had is one
    line and exit status 2, not uvicorn exiting while the model loads on its thread (which aborts
    the process from native code: "terminate called without an active exception")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError, ValueError) as exc:
        raise BitDanceError(f"cannot listen on {host}:{port}: {exc}") from None


def serve(loader, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve what `loader()` returns (a Pipeline) until a shutdown signal; the exit status: 0, or 1
    when the model failed to load."""
    failed = []
    server: _DrainingServer | None = None

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        log.error("bitdance-rt serve: the model failed to load: %s", exc)
        if server is not None:
            server.should_exit = True

    sock = listen(host, port)
    app = make_app(settings=settings, loader=loader, on_load_error=load_failed)
    server = uvicorn_server(app, settings, host, port, log_level)
    server.run(sockets=[sock])
    return 1 if failed else 0
