"""Helpers of the HTTP server tests: free loopback ports, a server in a thread or a process
(always stopped), PNG answers as arrays."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_array(b64: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A b64 PNG as a uint8 [H, W, 3] array; fails unless it is a valid RGB PNG (of `size` W x H)."""
    from PIL import Image

    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = Image.open(io.BytesIO(raw))
    image.verify()
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG" and image.mode == "RGB", (image.format, image.mode)
    if size is not None:
        assert image.size == size, image.size
    return np.asarray(image)


def sse_events(lines) -> list[tuple[str | None, str]]:
    """(event, data) of a text/event-stream, from its lines."""
    events, event, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        events.append((event, "\n".join(data)))
    return events


class ThreadServer:
    """uvicorn serving `app` on a free loopback port, in a thread of this process; with `settings`,
    configured as `bitdance-rt serve` configures it (its protocol and time limits)."""

    def __init__(self, app, settings=None):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if settings is not None:
            from bitdance_rt.serve.server import uvicorn_server

            self.server = uvicorn_server(app, settings, "127.0.0.1", self.port, "warning")
        else:
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def server_process(args: list[str], env: dict, port: int, ready_s: float = 300):
    """`bitdance-rt serve ARGS` in a process of its own, its output in a temporary file (never a
    pipe nobody reads); waits for /health; killed by PID at the end."""
    import tempfile

    import httpx

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bitdance_rt", "serve", "--port", str(port), *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + ready_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(
                        f"the server did not become ready (exit status {proc.poll()}): {log.read()[-3000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
