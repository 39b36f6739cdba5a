"""The load generator of bench_http.py: requests to OpenAI's Images API (POST /v1/images/generations),
the checks of every answer, one level of C closed-loop workers; and what the benchmark reads of the
server (/health until it is ready, the /metrics counters before and after).

Bench.request sends one request (streamed or not) and times it: latency to the last byte, time to the
first byte and to the first partial image. An answer counts only when it holds n PNG images (Pillow
decodes them) of the expected size, and a stream only when it ends with [DONE]; anything else is an
error of its kind (the HTTP status, or "timeout", "bad_image", "bad_stream", ...). Bench.level runs C
workers, each sending its next request when the previous one has been answered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENDPOINT = "/v1/images/generations"


class BadAnswer(Exception):
    """A 200 answer that fails the checks; .kind names the error class in the counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def png_size(b64: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, fully decoded (a truncated file fails)."""
    from PIL import Image

    if not isinstance(b64, str) or not b64:
        raise BadAnswer("bad_image", "b64_json missing or empty")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadAnswer("bad_image", f"b64_json is not base64: {e}") from None
    if not raw.startswith(PNG_MAGIC):
        raise BadAnswer("bad_image", f"not a PNG (starts {raw[:8]!r})")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                raise BadAnswer("bad_image", f"Pillow reads {im.format}, not PNG")
            im.load()
            return im.size
    except BadAnswer:
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds)
        raise BadAnswer("bad_image", f"PNG does not decode: {e}") from None


@dataclass
class Result:
    ok: bool = False
    kind: str | None = None  # error class: HTTP status ("429") or a name ("timeout", "bad_image", ...)
    message: str = ""
    latency: float = float("nan")  # sent -> last byte
    ttfb: float | None = None  # sent -> first byte of the body
    ttfp: float | None = None  # sent -> first partial_image event (streams)
    images: int = 0
    partials: int = 0
    retry_after: float | None = None


@dataclass
class Level:
    name: str
    concurrency: int
    stream: bool
    partial_images: int
    results: list = field(default_factory=list)
    wall: float = 0.0


class Bench:
    def __init__(self, args, client: httpx.AsyncClient):
        self.args = args
        self.client = client
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.expected_size = tuple(args.size) if args.size else None
        self.counter = 0  # every request sent (the seed and the label/prompt rotate with it)
        self.messages = Counter()  # error kind: message -> count, to print a few

    # --- requests ---------------------------------------------------------------------------
    def body(self, i: int, stream: bool, partial_images: int) -> dict:
        a = self.args
        b = {"n": a.n, "response_format": "b64_json", "seed": a.seed + i, "stream": stream}
        if a.labels:
            b["prompt"] = ""
            b["labels"] = [a.labels[i % len(a.labels)]]  # n images of one label per request
        else:
            b["prompt"] = a.prompt[i % len(a.prompt)]
        if a.steps is not None:
            b["steps"] = a.steps
        if a.size:
            b["size"] = f"{a.size[0]}x{a.size[1]}"
        if stream:
            b["partial_images"] = partial_images
        b.update(a.extra)
        return b

    def _check_size(self, size):
        if self.expected_size is None:
            self.expected_size = size
        elif tuple(size) != tuple(self.expected_size):
            raise BadAnswer(
                "wrong_size", f"image {size[0]}x{size[1]}, expected {self.expected_size[0]}x{self.expected_size[1]}"
            )

    async def request(self, stream: bool, partial_images: int) -> Result:
        i = self.counter
        self.counter += 1
        r = Result()
        finals, previews = [], []
        t0 = time.perf_counter()
        try:
            async with self.client.stream(
                "POST", ENDPOINT, json=self.body(i, stream, partial_images), headers=self.headers
            ) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    r.latency = time.perf_counter() - t0
                    r.kind, r.message = str(resp.status_code), _error_message(raw)
                    ra = resp.headers.get("retry-after")
                    if ra is not None:
                        try:
                            r.retry_after = float(ra)
                        except ValueError:
                            pass
                elif stream:
                    await self._read_events(resp, t0, r, finals, previews)
                else:
                    chunks = []
                    async for chunk in resp.aiter_bytes():
                        if r.ttfb is None:
                            r.ttfb = time.perf_counter() - t0
                        chunks.append(chunk)
                    r.latency = time.perf_counter() - t0
                    try:
                        data = json.loads(b"".join(chunks))
                        finals = [d.get("b64_json") for d in data["data"]]
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        raise BadAnswer("bad_json", f"answer is not {{'data': [{{'b64_json': ...}}]}}: {e!r}") from None
            if r.kind is None:  # not an HTTP error: check it, after the last byte, outside the timing
                self._check(finals, previews, r.partials if stream else None, partial_images)
                r.ok, r.images = True, len(finals)
        except BadAnswer as e:
            r.kind, r.message = e.kind, str(e)
        except httpx.TimeoutException as e:
            r.kind, r.message = "timeout", f"{type(e).__name__} after {time.perf_counter() - t0:.1f} s"
        except httpx.TransportError as e:  # refused, reset, closed mid-answer
            r.kind, r.message = "connection", f"{type(e).__name__}: {e}"
        except httpx.RequestError as e:  # e.g. a body that does not decode
            r.kind, r.message = "protocol", f"{type(e).__name__}: {e}"
        if math.isnan(r.latency):
            r.latency = time.perf_counter() - t0
        if not r.ok:
            self.messages[f"{r.kind}: {r.message[:200]}"] += 1
        return r

    def _check(self, finals: list, previews: list, partials: int | None, partial_images: int) -> None:
        """BadAnswer unless the answer holds n PNGs of the expected size (and decodable previews)."""
        if len(finals) != self.args.n:
            raise BadAnswer("wrong_count", f"{len(finals)} images, asked for {self.args.n}")
        for b64 in finals:
            self._check_size(png_size(b64))
        for b64 in previews:
            png_size(b64)  # previews must decode; their size is the server's choice
        if partials is not None and partials > partial_images * self.args.n:
            raise BadAnswer(
                "too_many_partials", f"{partials} partial images, asked for at most {partial_images} per image"
            )

    async def _read_events(self, resp, t0, r: Result, finals: list, previews: list) -> None:
        """Server-sent events: partial_image* / completed per image, then data: [DONE]."""
        ctype = resp.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            await resp.aread()
            raise BadAnswer("bad_stream", f"streamed answer has content-type {ctype!r}")
        event, data, done = None, [], False
        async for line in resp.aiter_lines():
            now = time.perf_counter() - t0
            if r.ttfb is None:
                r.ttfb = now
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                continue
            if not data:  # blank line without data: nothing to dispatch
                event = None
                continue
            payload, data = "\n".join(data), []
            if payload == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(payload)
            except ValueError:
                raise BadAnswer("bad_stream", f"event data is not JSON: {payload[:80]!r}") from None
            kind = (obj.get("type") if isinstance(obj, dict) else None) or event
            if kind == "image_generation.partial_image":
                r.partials += 1
                if r.ttfp is None:
                    r.ttfp = now
                previews.append(obj.get("b64_json"))
            elif kind == "image_generation.completed":
                finals.append(obj.get("b64_json"))
            elif kind == "error" or (isinstance(obj, dict) and "error" in obj):
                err = obj.get("error", obj) if isinstance(obj, dict) else obj
                raise BadAnswer("stream_error", str(err.get("message", err) if isinstance(err, dict) else err))
            event = None
        r.latency = time.perf_counter() - t0
        if not done:
            raise BadAnswer("bad_stream", f"stream ended without data: [DONE] ({len(finals)} images)")

    # --- a level: C closed-loop workers ---------------------------------------------------------
    async def level(self, name, concurrency, stream, partial_images, requests=None, seconds=None) -> Level:
        lv = Level(name, concurrency, stream, partial_images)
        issued = 0
        start = time.perf_counter()
        deadline = start + seconds if seconds is not None else None

        async def worker():
            nonlocal issued
            while True:
                if deadline is not None:
                    if time.perf_counter() >= deadline:
                        return
                elif issued >= requests:
                    return
                issued += 1
                res = await self.request(stream, partial_images)
                lv.results.append(res)
                if res.retry_after is not None and res.kind in ("429", "503"):
                    wait = min(res.retry_after, self.args.max_retry_wait)
                    if deadline is not None:
                        wait = min(wait, max(0.0, deadline - time.perf_counter()))
                    await asyncio.sleep(wait)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        lv.wall = time.perf_counter() - start
        return lv


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return f"{err.get('type')}/{err.get('code')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw[:200].decode("utf-8", "replace")


# ---- what it reads of the server: /health, /metrics -------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments and unparsable lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+-?\d+)?$", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


def metric_deltas(before: dict, after: dict) -> dict[str, float]:
    """Counters (_total, and histograms' _count/_sum) that moved between two scrapes."""
    out = {}
    for key, v in after.items():
        name = key.split("{", 1)[0]
        if name.endswith(("_total", "_count", "_sum")) and not name.endswith("_created"):
            d = v - before.get(key, 0.0)
            if d:
                out[key] = d
    return out


async def wait_ready(client: httpx.AsyncClient, url: str, timeout: float) -> dict:
    """Poll /health until 200; SystemExit with the reason when the server is unreachable or never ready."""
    deadline = time.monotonic() + timeout
    last = None
    reached = False
    while True:
        try:
            resp = await client.get("/health", timeout=5.0)
            reached = True
            if resp.status_code == 200:
                try:
                    return resp.json() if resp.content else {}
                except ValueError:
                    return {"body": resp.text[:200]}
            if resp.status_code != 503:
                raise SystemExit(
                    f"bench_http: GET {url}/health answered HTTP {resp.status_code}: {_error_message(resp.content)}"
                )
            last = f"HTTP 503 (loading): {_error_message(resp.content)}"
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            if not reached:
                raise SystemExit(
                    f"bench_http: no server at {url} ({last}) after {timeout:g} s; start one with "
                    f"`bitdance-rt serve --host 127.0.0.1 --port PORT` and pass --url"
                )
            raise SystemExit(f"bench_http: {url} not ready after {timeout:g} s: {last}")
        await asyncio.sleep(0.25)


async def scrape(client, headers) -> dict | None:
    try:
        resp = await client.get("/metrics", headers=headers, timeout=10.0)
    except httpx.TransportError:
        return None
    return parse_metrics(resp.text) if resp.status_code == 200 else None
