"""Export every stage of full-size presets (random weights) and report sizes, checks and times.

    python benchmarks/export_presets.py BitDance-B-1x BitDance-B-16x
    python benchmarks/export_presets.py --all --keep /data/exports

The tests export the tiny fixture models; this exercises the same code on the official shapes
(external data above 1.5 GB, onnx.checker by path, strict shape inference, manifest). Each
export goes to a temp dir that is deleted afterwards unless --keep is given. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bitdance_rt.config import PRESETS, load_config
from bitdance_rt.export import export_stages, random_source
from bitdance_rt.models import BitDance
from bitdance_rt.models.init import random_init
from bitdance_rt.stages import ALL_STAGES

FULL_SIZE = [n for n in PRESETS if n.startswith("BitDance-")]


def export_one(name: str, root: Path, steps: int, opset: int) -> dict:
    cfg = load_config(name)
    t0 = time.perf_counter()
    model = random_init(BitDance(cfg).eval(), 0)
    built = time.perf_counter() - t0
    out = root / name
    t0 = time.perf_counter()
    res = export_stages(model, out, random_source(0), stages=list(ALL_STAGES), sampler_steps=steps, opset=opset)
    took = time.perf_counter() - t0
    files = res.manifest["files"]
    sizes = {
        stage: sum(files[f]["bytes"] for f in names) / 2**20 for stage, names in res.manifest["stage_files"].items()
    }
    print(
        f"{name}: built {built:.0f}s, exported + checked {len(sizes)} stages in {took:.0f}s "
        f"({sum(sizes.values()) / 1024:.2f} GiB)"
    )
    for stage, mb in sizes.items():
        external = any(f.endswith(".data") for f in res.manifest["stage_files"][stage])
        print(f"  {stage:<22} {mb:>9.1f} MiB{'  (external data)' if external else ''}")
    return {"model": name, "seconds": took, "stage_mib": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", default=[])
    ap.add_argument("--all", action="store_true", help=f"all full-size presets: {', '.join(FULL_SIZE)}")
    ap.add_argument("--steps", type=int, default=25, help="S of the fused head samplers")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--keep", default=None, help="keep the exports under this directory")
    args = ap.parse_args()
    names = FULL_SIZE if args.all else (args.presets or ["BitDance-B-1x", "BitDance-B-16x"])
    torch.set_num_threads(2)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bitdance-presets-"))
    results = []
    try:
        for name in names:
            results.append(export_one(name, root, args.steps, args.opset))
            if not args.keep:
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"exports": results}))


if __name__ == "__main__":
    main()
