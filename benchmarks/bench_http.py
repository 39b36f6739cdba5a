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
import json
import math
import re
from collections import Counter

import httpx
from http_load import Bench, Level, metric_deltas, scrape, wait_ready


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
