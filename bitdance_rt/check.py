"""`bitdance-rt check`: an accelerated backend against the torch reference, stage by stage and end to end.

Per stage, one harness for every backend: Polygraphy's Comparator runs the torch stage module
(TorchStageRunner, below) and the candidate (`ort_runner`: the ONNX Runtime backend's session;
`trt_runner`: the cached TensorRT engine) on the same valid inputs (`example_feed`) and compares
every output with its own tolerance (TOLERANCES), +/-1 codes by agreement (CODE_OUTPUTS). A stage
with phases (the backbone: one graph for the prefill and the steps) is compared in each phase, on
its shapes and, on TensorRT, its optimisation profile. End to end (`--noise-from`, `end_to_end`):
both backends generate with the same recorded noise and their tokens must agree. The Polygraphy
API used, and the versions it was checked on: `_polygraphy`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import stages as st
from .backends import BackendOptions, ModelSource, ort_providers
from .errors import BitDanceError

# Per-output (atol, rtol) for continuous outputs, by engine precision; "" is the default.
TOLERANCES = {
    "fp32": {"": (1e-4, 1e-4)},
    "fp16": {"": (5e-2, 5e-2), "kv_new": (5e-2, 5e-2)},
    "int8": {"": (2e-1, 2e-1)},
    "bf16": {"": (2e-1, 2e-1)},  # (unmeasured: INT8's bounds; BF16 rounds 8x coarser than FP16)
}
# Outputs that are +/-1 codes (sampler `tokens`, encoder `latent`) are compared by agreement (share of
# equal signs) instead, which must reach `min_agreement` (default by precision: 1.0, i.e. identical, for fp32).
CODE_OUTPUTS = {"tokens", "latent"}
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.98, "bf16": 0.95, "int8": 0.95}


def _polygraphy(verbose: bool = False):
    """Polygraphy's Comparator and CompareFunc, or a one-line error saying how to install it.

    Polygraphy API used (polygraphy 0.49+: polygraphy.comparator.Comparator.run / compare_accuracy,
    whose return type changed after 0.49 (see _first_accuracy); SimpleCompareFunc (newer) or
    CompareFunc.simple (0.49) with per-output dicts keyed by output name, "" = default; BaseRunner's
    activate_impl / get_input_metadata_impl / infer_impl; backend.onnxrt.OnnxrtRunner;
    backend.trt.TrtRunner(engine, name, optimization_profile) + EngineFromBytes), as documented in
    Polygraphy's API reference (docs.nvidia.com/deeplearning/tensorrt/polygraphy/docs/)."""
    try:
        from polygraphy.comparator import CompareFunc, Comparator
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BitDanceError("bitdance-rt check needs Polygraphy: pip install polygraphy") from None
    if not verbose:
        G_LOGGER.module_severity = G_LOGGER.ERROR  # our report says per output what Polygraphy found
    return Comparator, CompareFunc


class Agreement:
    """Comparison result of a +/-1 output: share of equal signs, passed if >= the threshold."""

    def __init__(self, a: np.ndarray, b: np.ndarray, threshold: float):
        a, b = np.sign(np.asarray(a, dtype=np.float32)), np.sign(np.asarray(b, dtype=np.float32))
        self.shape_ok = a.shape == b.shape
        self.value = float((a == b).mean()) if self.shape_ok and a.size else (1.0 if self.shape_ok else 0.0)
        self.threshold = threshold

    def __bool__(self) -> bool:
        return self.shape_ok and self.value >= self.threshold

    def __repr__(self) -> str:
        return f"Agreement({self.value:.6f} >= {self.threshold})"


def tolerances(precision: str, outputs) -> tuple[dict, dict]:
    """Per-output atol and rtol dicts for CompareFunc.simple ("" = default)."""
    tol = TOLERANCES[precision]
    atol, rtol = {"": tol[""][0]}, {"": tol[""][1]}
    for name in outputs:
        a, r = (2.0, 2.0) if name in CODE_OUTPUTS else tol.get(name, tol[""])  # codes: judged by Agreement
        atol[name], rtol[name] = a, r
    return atol, rtol


def make_compare_func(precision: str, outputs, min_agreement: float | None = None):
    """Polygraphy compare func: SimpleCompareFunc with per-output tolerances; codes by agreement."""
    _, CompareFunc = _polygraphy()
    atol, rtol = tolerances(precision, outputs)
    try:  # SimpleCompareFunc replaces CompareFunc.simple (deprecated in newer Polygraphy)
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        SimpleCompareFunc = CompareFunc.simple
    simple = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
    threshold = MIN_AGREEMENT[precision] if min_agreement is None else float(min_agreement)

    def compare(ref, cand):
        out = simple(ref, cand)
        for name in list(out):
            if name in CODE_OUTPUTS:
                out[name] = Agreement(ref[name], cand[name], threshold)
        return out

    return compare


def _torch_runner_class():
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchStageRunner(BaseRunner):
        """The torch reference of one stage (export.wrappers.stage_module) as a Polygraphy runner."""

        def __init__(self, module: torch.nn.Module, spec: st.StageSpec, device: str = "cpu"):
            super().__init__(name=f"torch-{spec.name}", prefix="torch-runner")
            self.module, self.spec, self.device = module, spec, torch.device(device)

        def activate_impl(self):
            self.module.to(self.device).eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in self.spec.inputs:
                meta.add(t.name, dtype=np.dtype(t.dtype), shape=[d if isinstance(d, int) else None for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            args = [torch.from_numpy(np.asarray(feed_dict[t.name])).to(self.device) for t in self.spec.inputs]
            start = time.perf_counter()
            with torch.inference_mode():
                outs = self.module(*args)
            self.inference_time = time.perf_counter() - start
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return OrderedDict(
                (t.name, o.detach().float().cpu().numpy() if o.is_floating_point() else o.detach().cpu().numpy())
                for t, o in zip(self.spec.outputs, outs)
            )

        def deactivate_impl(self):
            pass

    return TorchStageRunner


# ---- results --------------------------------------------------------------------------------
@dataclass
class OutputResult:
    name: str
    passed: bool
    detail: str  # "max |diff| 3.1e-06 (atol 1e-04, rtol 1e-04)" or "agreement 1.000000 (>= 1.0)"


@dataclass
class StageResult:
    stage: str
    outputs: list[OutputResult]
    phase: str | None = None  # of a stage with phases (the backbone)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def label(self) -> str:
        return self.stage if self.phase is None else f"{self.stage} ({self.phase})"


@dataclass
class CheckReport:
    backend: str
    precision: str
    stages: list[StageResult] = field(default_factory=list)
    end_to_end: dict | None = None

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages) and (self.end_to_end is None or self.end_to_end["passed"])

    def text(self) -> str:
        lines = [f"check {self.backend} ({self.precision}) against torch fp32:"]
        for s in self.stages:
            lines.append(f"  {s.label}: {'PASS' if s.passed else 'FAIL'}")
            lines += [f"    {o.name}: {'ok' if o.passed else 'FAILED'}, {o.detail}" for o in s.outputs]
        if self.end_to_end is not None:
            e = self.end_to_end
            lines.append(
                f"  end to end ({e['images']} image(s), noise {e['noise']}): "
                f"{'PASS' if e['passed'] else 'FAIL'}, token agreement {e['agreement']:.6f} "
                f"(>= {e['threshold']}), {e['identical_images']} of {e['images']} images with identical "
                f"tokens, image max |diff| {e['image_max_diff']:.2e}"
            )
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


# ---- the comparisons -------------------------------------------------------------------------
def example_feed(model, spec: st.StageSpec, batch: int = 2, seed: int = 0, phase: str | None = None) -> OrderedDict:
    """Valid inputs of one call of `spec` (export.wrappers.example_inputs: a step, for the backbone). The
    backbone's prefill: the prefix embeddings (torch prefix_embed of example labels / ids) at start 0,
    as the runtime calls it."""
    from .export.wrappers import example_inputs, stage_module

    if phase is not None and phase not in spec.phases:
        raise BitDanceError(
            f"stage {spec.name} has no phase {phase!r} (its phases: {', '.join(spec.phases) or 'none'})"
        )
    feed = OrderedDict((t.name, x) for t, x in zip(spec.inputs, example_inputs(spec, model, batch, seed)))
    if phase == "prefill" and spec.name == st.BACKBONE:
        prefix = st.stage_spec(st.PREFIX_EMBED, model.cfg)
        with torch.inference_mode():
            feed["x"] = stage_module(st.PREFIX_EMBED, model)(*example_inputs(prefix, model, batch, seed)).float()
        feed["start"] = torch.zeros_like(feed["start"])
    elif phase is not None and phase != "step":
        raise BitDanceError(f"no example inputs for phase {phase!r} of stage {spec.name}")
    return OrderedDict((k, v.detach().cpu().numpy()) for k, v in feed.items())


def compare_stage(
    model,
    spec: st.StageSpec,
    candidate,
    precision: str = "fp32",
    batch: int = 2,
    seed: int = 0,
    min_agreement: float | None = None,
    device: str = "cpu",
    phase: str | None = None,
) -> StageResult:
    """Run torch and `candidate` (a Polygraphy runner) on the same inputs (of `phase`, for a stage with
    phases) and compare every output."""
    from .export.wrappers import stage_module

    Comparator, _ = _polygraphy()
    feed = example_feed(model, spec, batch, seed, phase)
    reference = _torch_runner_class()(stage_module(spec.name, model), spec, device)
    results = Comparator.run([reference, candidate], data_loader=[feed])
    accuracy = Comparator.compare_accuracy(
        results, compare_func=make_compare_func(precision, spec.output_names, min_agreement)
    )
    ((_, iterations),) = _first_accuracy(accuracy).items()
    (per_output,) = iterations
    atol, rtol = tolerances(precision, per_output)
    out = []
    for name, res in per_output.items():
        if isinstance(res, Agreement):
            detail = f"agreement {res.value:.6f} (>= {res.threshold})"
        else:
            detail = f"max |diff| {float(res.max_absdiff):.2e} (atol {atol[name]:.0e}, rtol {rtol[name]:.0e})"
        out.append(OutputResult(name, bool(res), detail))
    out += [OutputResult(n, False, "not produced by the candidate") for n in spec.output_names if n not in per_output]
    return StageResult(spec.name, out, phase)


def _first_accuracy(accuracy):
    """The AccuracyResult of our one compare func. Comparator.compare_accuracy returns it directly in
    Polygraphy 0.49.x (the version in TensorRT 10.3 .. 11.1's tools/Polygraphy: an ordered dict of
    runner pair -> per-iteration results) and, in later Polygraphy, AccuracyResults (a list, one per
    compare func), which has no items()."""
    return accuracy if hasattr(accuracy, "items") else accuracy[0]


def ort_runner(backend, stage: str, phase: str | None = None):
    """The stage's session (one session serves every phase: its shapes are dynamic)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(backend._get_session(stage), name=f"onnxruntime-{stage}" + (f"-{phase}" if phase else ""))


def trt_runner(backend, stage: str, phase: str | None = None):
    """The stage's engine, on the optimisation profile of `phase` (engines.profiles.profile_index)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from .engines.profiles import profile_index

    spec = backend.specs[stage]
    profile = profile_index(spec, phase) if spec.phases else None
    return TrtRunner(
        EngineFromBytes(backend.engine_paths[stage].read_bytes()),
        optimization_profile=profile,
        name=f"tensorrt-{stage}" + (f"-{phase}" if phase else ""),
    )


def end_to_end(
    reference, candidate, labels, steps: int, cfg: float, schedule: str, noise_path, threshold: float
) -> dict:
    """Generate with both backends from the same recorded noise; compare tokens and images. The tokens
    must agree (fp32: identical; fp16 / int8: the agreement is reported and checked against `threshold`,
    the run's min_agreement)."""
    from .runtime import generate
    from .sampling import ReplayNoise

    ref = generate(reference, labels, steps, cfg, schedule, ReplayNoise(noise_path))
    got = generate(candidate, labels, steps, cfg, schedule, ReplayNoise(noise_path))
    same = ref.tokens == got.tokens.to(ref.tokens.device)
    agreement = float(same.float().mean())
    return {
        "images": len(labels),
        "noise": str(noise_path),
        "agreement": agreement,
        "threshold": threshold,
        "identical_images": int(same.flatten(1).all(dim=1).sum()),
        "passed": agreement >= threshold,
        "image_max_diff": float((ref.image - got.image.to(ref.image.device)).abs().max()),
    }


@dataclass
class CheckRequest:
    """What `bitdance-rt check` compares: an export (on `opts.backend`) against the torch reference."""

    export_dir: str
    stages: list | None = None
    batch: int = 2
    noise_from: str | None = None
    labels: list | None = None
    steps: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    min_agreement: float | None = None


def run_check(model: ModelSource, opts: BackendOptions, req: CheckRequest) -> CheckReport:
    """Stage comparisons of req.export_dir against `model`'s torch reference, then optionally end to end."""
    from .runtime.torch_backend import TorchBackend

    _polygraphy()
    if req.batch < 1:
        raise BitDanceError(f"--batch must be >= 1, got {req.batch}")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    cfg = model.config
    reference = model.load(opts.allow_pickle).to(opts.device).eval()
    name = opts.backend or "onnxruntime"
    if name == "onnxruntime":
        from .runtime.ort_backend import OrtBackend

        source = model.weights_source() if model.checkpoint else None
        backend = OrtBackend(
            req.export_dir, threads=opts.threads, providers=ort_providers(opts), expect_config=cfg, expect_source=source
        )
        make_runner, precision = ort_runner, backend.export.precision
    elif name == "tensorrt":
        from .runtime.trt_backend import TrtBackend

        backend = TrtBackend.from_export(
            req.export_dir,
            precision=opts.precision,
            workspace_mb=opts.workspace_mb,
            engine_root=opts.engine_dir,
            cuda_graphs=opts.cuda_graphs,
            expect_config=cfg,
            weight_streaming_budget=opts.weight_streaming_budget,
        )
        make_runner, precision = trt_runner, backend.precision
    else:
        raise BitDanceError(f"check compares onnxruntime or tensorrt against torch, not {name}")
    if req.batch > backend.max_batch:
        raise BitDanceError(f"--batch {req.batch} is above the export's max batch {backend.max_batch}")
    stages = req.stages or [s for s in st.ALL_STAGES if s in backend.specs]
    unknown = [s for s in stages if s not in backend.specs]
    if unknown:
        raise BitDanceError(f"{req.export_dir} has no stage(s) {', '.join(unknown)}")
    report = CheckReport(name, precision)
    for stage in stages:
        spec = backend.specs[stage]
        for phase in spec.profile_phases:  # [None] for a stage without phases
            report.stages.append(
                compare_stage(
                    reference,
                    spec,
                    make_runner(backend, stage, phase),
                    precision,
                    req.batch,
                    min_agreement=req.min_agreement,
                    device=opts.device,
                    phase=phase,
                )
            )
    if req.noise_from:
        labels = req.labels
        if labels is None:
            from safetensors import safe_open

            with safe_open(str(req.noise_from), "pt") as f:
                if "labels" not in f.keys():
                    raise BitDanceError(f"{req.noise_from} holds no `labels`: pass --labels")
                labels = [int(x) for x in f.get_tensor("labels")]
        steps = backend.sampler_steps if req.steps is None else req.steps
        scale = cfg.default_cfg if req.cfg is None else req.cfg
        threshold = MIN_AGREEMENT[precision] if req.min_agreement is None else req.min_agreement
        report.end_to_end = end_to_end(
            TorchBackend(reference, opts.device),
            backend,
            labels,
            steps,
            scale,
            req.cfg_schedule,
            req.noise_from,
            threshold,
        )
    return report
