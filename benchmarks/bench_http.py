"""HTTP serving under load: a closed-loop concurrency sweep against a running `bitdance-rt serve`.

    bitdance-rt serve --host 127.0.0.1 --port 8000 &                     # the embedded model
    python benchmarks/bench_http.py --url http://127.0.0.1:8000
    python benchmarks/bench_http.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --seconds-per-level 20 \\
        --plot sweep.png
    python benchmarks/bench_http.py --url http://127.0.0.1:8000 --stream --partial-images 2 --labels 3 7

The server speaks OpenAI's Images API (POST /v1/images/generations, b64_json answers, server-sent
events when streamed). At each concurrency level C, C workers each send their next request when the
previous one has been answered (a closed loop: the offered load follows the server's speed). Per level:
- images/s and requests/s (answers that passed the checks, over the level's wall time);
- latency p50/p95/p99, request sent -> last byte of the answer;
- time to first partial image (streamed with --partial-images > 0: the first
  image_generation.partial_image event) or to the first byte of the answer (otherwise);
- errors by HTTP status or kind: every answer must hold n PNG images (Pillow decodes them) of the
  expected size (--size, else the size of the first answer), streams must end with [DONE].
Preview cost: one level (--preview-concurrency) streamed with partial_images=0 and with
partial_images=3, the same requests, and the ratios of throughput and latency between them.
/metrics is read before and after; the counters the run moved are reported. The client shares the
machine with a local server (its CPU time counts against the server's), so ratios measured in one run
compare like with like; absolute numbers are this machine's. Prints a table, saves a plot of p50/p95
latency against throughput with --plot, and ends with one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
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


def _pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def _ratio(a, b):
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else float("nan")


def _clean(obj):
    """NaN/inf -> None, so the JSON line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


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


def summarize(lv: Level) -> dict:
    ok = [r for r in lv.results if r.ok]
    lat = [r.latency for r in ok]
    ttfb = [r.ttfb for r in ok if r.ttfb is not None]
    ttfp = [r.ttfp for r in ok if r.ttfp is not None]
    images = sum(r.images for r in ok)
    errors = Counter(r.kind for r in lv.results if not r.ok)
    wall = lv.wall or float("nan")
    first = ttfp if (lv.stream and lv.partial_images > 0) else ttfb
    return {
        "name": lv.name,
        "concurrency": lv.concurrency,
        "stream": lv.stream,
        "partial_images": lv.partial_images if lv.stream else None,
        "requests": len(lv.results),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "requests_per_s": len(ok) / wall,
        "p50_s": _pct(lat, 50),
        "p95_s": _pct(lat, 95),
        "p99_s": _pct(lat, 99),
        "mean_s": sum(lat) / len(lat) if lat else float("nan"),
        "first_kind": "partial_image" if first is ttfp else "first_byte",
        "first_p50_s": _pct(first, 50),
        "first_p95_s": _pct(first, 95),
        "ttfb_p50_s": _pct(ttfb, 50),
        "ttfp_p50_s": _pct(ttfp, 50) if ttfp else None,
        "ttfp_p95_s": _pct(ttfp, 95) if ttfp else None,
        "partials_per_image": (sum(r.partials for r in ok) / images) if (lv.stream and images) else None,
    }


HEAD = (
    f"{'level':<16} {'C':>3} {'req':>5} {'ok':>5} {'err':>4} {'img/s':>8} {'req/s':>8} {'p50 s':>8} "
    f"{'p95 s':>8} {'p99 s':>8} {'first p50':>10} {'first p95':>10}  errors"
)


def row(s: dict) -> str:
    errs = " ".join(f"{k}:{v}" for k, v in s["errors_by_status"].items()) or "-"
    first = "TTFP" if s["first_kind"] == "partial_image" else "TTFB"
    return (
        f"{s['name']:<16} {s['concurrency']:>3} {s['requests']:>5} {s['ok']:>5} {s['errors']:>4} "
        f"{s['images_per_s']:>8.3f} {s['requests_per_s']:>8.3f} {s['p50_s']:>8.3f} {s['p95_s']:>8.3f} "
        f"{s['p99_s']:>8.3f} {s['first_p50_s']:>10.3f} {s['first_p95_s']:>10.3f}  {errs} ({first})"
    )


def plot(levels: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = [s["images_per_s"] for s in levels]
    ax.plot(x, [s["p50_s"] for s in levels], "o-", label="p50")
    ax.plot(x, [s["p95_s"] for s in levels], "s--", label="p95")
    for s in levels:
        ax.annotate(
            f"C={s['concurrency']}",
            (s["images_per_s"], s["p50_s"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


async def run(args) -> dict:
    limits = httpx.Limits(
        max_connections=max(args.concurrency + [args.preview_concurrency or 1]) + 4,
        max_keepalive_connections=max(args.concurrency + [args.preview_concurrency or 1]) + 4,
    )
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=timeout, trust_env=False) as client:
        health = await wait_ready(client, args.url, args.wait)
        bench = Bench(args, client)
        per_level = (
            {"requests": args.requests_per_level}
            if args.seconds_per_level is None
            else {"seconds": args.seconds_per_level}
        )

        before = await scrape(client, bench.headers)
        warm = []
        for _ in range(args.warmup):
            warm.append(await bench.request(args.stream, args.partial_images))
        if warm and not any(r.ok for r in warm):
            r = warm[0]
            raise SystemExit(f"bench_http: every warm-up request failed; the first: {r.kind}: {r.message}")
        size = bench.expected_size
        print(
            f"{args.url}: health {json.dumps(health)[:160]}; {'streamed' if args.stream else 'non-streamed'} "
            f"requests of n={args.n}"
            + (f", partial_images={args.partial_images}" if args.stream else "")
            + (f", images {size[0]}x{size[1]}" if size else "")
            + f"; warm-up {args.warmup} requests"
            + (f" ({sum(r.latency for r in warm) / len(warm):.3f} s mean)" if warm else "")
            + "; per level: "
            + (
                f"{args.requests_per_level} requests"
                if args.seconds_per_level is None
                else f"{args.seconds_per_level:g} s"
            ),
            flush=True,
        )

        print("\n" + HEAD, flush=True)
        levels = []
        for c in args.concurrency:
            reqs = per_level.get("requests")
            lv = await bench.level(
                "sweep",
                c,
                args.stream,
                args.partial_images,
                requests=None if reqs is None else max(reqs, c),
                seconds=per_level.get("seconds"),
            )
            s = summarize(lv)
            levels.append(s)
            print(row(s), flush=True)

        preview = None
        if args.preview_concurrency:
            c = args.preview_concurrency
            runs = {0: [], args.preview_partials: []}
            for _ in range(args.preview_repeats):  # alternated, so drift hits both alike
                for k in runs:
                    reqs = per_level.get("requests")
                    runs[k].append(
                        await bench.level(
                            f"stream k={k}",
                            c,
                            True,
                            k,
                            requests=None if reqs is None else max(reqs, c),
                            seconds=per_level.get("seconds"),
                        )
                    )
            pooled = {}
            for k, lvs in runs.items():
                merged = Level(f"stream k={k}", c, True, k)
                for lv in lvs:
                    merged.results += lv.results
                    merged.wall += lv.wall
                pooled[k] = summarize(merged)
                print(row(pooled[k]), flush=True)
            a, b = pooled[0], pooled[args.preview_partials]
            preview = {
                "concurrency": c,
                "partial_images": args.preview_partials,
                "repeats": args.preview_repeats,
                "without": a,
                "with": b,
                "images_per_s_ratio": _ratio(b["images_per_s"], a["images_per_s"]),
                "p50_ratio": _ratio(b["p50_s"], a["p50_s"]),
                "p95_ratio": _ratio(b["p95_s"], a["p95_s"]),
                "first_preview_p50_s": b["ttfp_p50_s"],
                "first_preview_vs_final_p50": _ratio(b["ttfp_p50_s"] or float("nan"), a["p50_s"]),
            }
            print(
                f"\npreview cost at C={c} (streamed, partial_images={args.preview_partials} / 0): "
                f"images/s x{preview['images_per_s_ratio']:.3f}, p50 latency x{preview['p50_ratio']:.3f}, "
                f"p95 x{preview['p95_ratio']:.3f}; first preview at p50 "
                f"{(b['ttfp_p50_s'] or float('nan')):.3f} s = {preview['first_preview_vs_final_p50']:.2f} of the "
                f"partial_images=0 p50 latency; {b['partials_per_image'] or 0:.2f} previews per image"
            )

        after = await scrape(client, bench.headers)
        deltas = metric_deltas(before, after) if before is not None and after is not None else None
        if deltas is None:
            print("\n/metrics: not readable (skipped)")
        else:
            shown = sorted(deltas.items())[: args.metrics_lines]
            print(
                f"\n/metrics counters moved by this run ({len(deltas)}"
                + (f", first {len(shown)}" if len(shown) < len(deltas) else "")
                + "):"
            )
            for k, v in shown:
                print(f"  {k} +{v:g}")
        if bench.messages:
            print("\nerrors seen (first kinds):")
            for msg, cnt in bench.messages.most_common(5):
                print(f"  {cnt} x {msg}")

        best = max(levels, key=lambda s: s["images_per_s"]) if levels else None
        if levels:
            print(
                f"\npeak {best['images_per_s']:.3f} images/s at C={best['concurrency']}; "
                f"C={levels[-1]['concurrency']} p50 / C={levels[0]['concurrency']} p50 = "
                f"{_ratio(levels[-1]['p50_s'], levels[0]['p50_s']):.2f}, throughput "
                f"x{_ratio(levels[-1]['images_per_s'], levels[0]['images_per_s']):.2f}"
            )
        if args.plot and levels:
            plot(
                levels,
                args.plot,
                f"{args.url} n={args.n} "
                + ("stream" if args.stream else "b64_json")
                + f"; C = {','.join(map(str, args.concurrency))}",
            )
            print(f"plot: {args.plot}")

        totals = {
            k: sum(s[k] for s in levels + ([preview["without"], preview["with"]] if preview else []))
            for k in ("requests", "ok", "errors", "images")
        }
        return {
            "bench": "http",
            "url": args.url,
            "health": health,
            "n": args.n,
            "stream": args.stream,
            "partial_images": args.partial_images if args.stream else None,
            "steps": args.steps,
            "image_size": list(size) if size else None,
            "per_level": per_level,
            "warmup": args.warmup,
            "levels": levels,
            "preview_cost": preview,
            "peak_images_per_s": best["images_per_s"] if best else None,
            "totals": totals,
            "server_metrics_delta": deltas,
        }


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return out


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    ap.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16], help="levels, e.g. 1,2,4,8,16")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--requests-per-level", type=int, default=16, help="requests per level (at least C; default 16)")
    g.add_argument(
        "--seconds-per-level",
        type=float,
        default=None,
        help="instead: send for T seconds per level (requests in flight then finish)",
    )
    ap.add_argument("--stream", action="store_true", help="the sweep streams (server-sent events)")
    ap.add_argument(
        "--partial-images",
        type=int,
        default=0,
        choices=range(4),
        metavar="K",
        help="previews per image when streamed (0..3)",
    )
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the server's)")
    ap.add_argument(
        "--labels",
        type=int,
        nargs="+",
        default=None,
        help="class labels, one per request, rotated (sent as 'labels': [L] with prompt '')",
    )
    ap.add_argument(
        "--prompt",
        nargs="+",
        default=["3"],
        help="prompts, rotated over the requests (class-conditional models: a class index; default 3)",
    )
    ap.add_argument(
        "--size",
        type=_size,
        default=None,
        help="WIDTHxHEIGHT: sent as 'size' and expected; default: the first answer's size is expected",
    )
    ap.add_argument("--extra", type=json.loads, default={}, help="JSON object merged into every request body")
    ap.add_argument("--seed", type=int, default=0, help="request i asks for seed SEED + i")
    ap.add_argument("--warmup", type=int, default=2, help="requests before the sweep, not counted")
    ap.add_argument(
        "--preview-concurrency",
        type=int,
        default=None,
        help="the preview-cost level's C (default: the sweep's middle level; 0 skips it)",
    )
    ap.add_argument(
        "--preview-partials",
        type=int,
        default=3,
        choices=range(1, 4),
        metavar="K",
        help="previews compared with none (default 3)",
    )
    ap.add_argument("--preview-repeats", type=int, default=1, help="alternated runs per preview setting, pooled")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--wait", type=float, default=120.0, help="how long to wait for /health, seconds")
    ap.add_argument(
        "--max-retry-wait", type=float, default=1.0, help="a worker sleeps min(Retry-After, this) after a 429/503"
    )
    ap.add_argument("--metrics-lines", type=int, default=20, help="/metrics counters printed (all in the JSON)")
    ap.add_argument("--plot", default=None, help="save p50/p95 latency vs throughput as this PNG")
    args = ap.parse_args(argv)
    args.url = args.url.rstrip("/")
    if args.preview_concurrency is None:
        args.preview_concurrency = args.concurrency[len(args.concurrency) // 2]
    if args.n < 1:
        ap.error("--n must be >= 1")
    if not isinstance(args.extra, dict):
        ap.error("--extra must be a JSON object")
    result = asyncio.run(run(args))
    print(json.dumps(_clean(result)))


if __name__ == "__main__":
    main()
