"""Run the app with uvicorn: bind, load the model on a thread (/health says when it is ready),
and on SIGTERM / SIGINT stop admitting, finish every request in flight, close the Pipeline, exit."""

from __future__ import annotations

import logging

import uvicorn

from .app import ServerSettings, make_app

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


def serve(loader, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> int:
    """Serve what `loader()` returns (a Pipeline) until a shutdown signal; the exit status: 0, or 1
    when the model failed to load."""
    failed = []
    server: _DrainingServer | None = None

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        log.error("bitdance-rt serve: the model failed to load: %s", exc)
        if server is not None:
            server.should_exit = True

    app = make_app(settings=settings, loader=loader, on_load_error=load_failed)
    # Requests get `request_timeout` to finish: the graceful shutdown waits that long, and a little more.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(settings.request_timeout) + 5)
    server = _DrainingServer(config, app.state.server)
    server.run()
    return 1 if failed else 0
