"""Commands that judge and write nothing: `plan` (the memory a model needs, and where it fits;
reads no weights) and `check` (an accelerated backend against the torch reference)."""

from __future__ import annotations

import json

from ..errors import BitDanceError
from .common import _model, _options


def cmd_check(args) -> int:
    from ..check import CheckRequest, run_check

    request = CheckRequest(
        args.export_dir,
        args.stages,
        args.batch,
        args.noise_from,
        args.labels,
        args.steps,
        args.cfg,
        args.cfg_schedule,
        args.min_agreement,
    )
    report = run_check(_model(args), _options(args, max_batch=16), request)
    print(report.text())
    return 0 if report.passed else 1


def cmd_plan(args) -> int:
    from dataclasses import asdict

    from ..plan import TARGETS, format_plan, plan
    from ..t2i_config import T2I_PRESETS, t2i_preset

    size = {
        k: v
        for k, v in (("height", args.height), ("width", args.width), ("max_text_tokens", args.max_text_tokens))
        if v is not None
    }
    if args.model in T2I_PRESETS:
        cfg = t2i_preset(args.model, **size)
    else:
        cfg = _model(args).config
    bad = [t for t in args.target or () if t not in TARGETS]
    if bad:
        raise BitDanceError(f"unknown target {bad[0]!r}: one of {', '.join(TARGETS)}")
    from ..plan.machines import format_road, parse_size, road_on

    budget = None if args.weight_streaming_budget is None else parse_size(args.weight_streaming_budget)
    p = plan(
        cfg,
        args.precision,
        args.backend,
        args.batch_size,
        guided=not args.no_cfg,
        workspace_mb=args.workspace_mb,
        weight_streaming_budget=budget,
    )

    r = road_on(
        cfg,
        args.precision,
        args.backend,
        args.batch_size,
        not args.no_cfg,
        args.workspace_mb,
        args.host_memory,
        args.gpu,
        args.target,
        weight_streaming_budget=budget,
    )  # each step of getting there, on the machines asked
    if args.json:
        targets = {t: dict(zip(("fits", "bytes_left"), p.fits(t))) for t in args.target or TARGETS}
        print(
            json.dumps(
                {
                    **asdict(p),
                    "weight_bytes": p.weight_bytes,
                    "total_bytes": p.total_bytes,
                    "total_if_once": p.total_if_once,
                    "targets": targets,
                    "road": r.to_json(),
                }
            )
        )
    else:
        print(format_plan(p, args.target))
        print(format_road(r))
    return 0
