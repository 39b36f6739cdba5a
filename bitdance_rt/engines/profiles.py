"""TensorRT optimisation profiles, derived only from the stage contract.

An engine with dynamic dims needs min/opt/max shapes for each dynamic input; if they came from
anywhere but bitdance_rt.stages, an engine could be built for batch sizes the runtime never
asks for (or refuse those it does). Inputs with fully static shapes need no profile entry.
A stage with phases (the backbone: prefill and step, `StageSpec.phases`) gets one profile per
phase, in `StageSpec.profile_phases` order, all in ONE engine: the weights are held once, and
profile k serves phase k (the runtime selects it per execution context). Every other stage has
one profile. The result is plain data (names and int tuples): the builder passes each entry to
IOptimizationProfile.set_shape, the engine cache hashes it, trtexec and the ORT TensorRT EP get
it as strings.
"""

from __future__ import annotations

from ..errors import BitDanceError
from ..stages import StageSpec

Shape = tuple[int, ...]
Profile = list[tuple[str, Shape, Shape, Shape]]  # (input name, min, opt, max), in input order
# The phase called every AR step (stages.backbone_phases): the only one replayed as a CUDA graph,
# and the one a single profile spanning all phases is tuned for.
HOT_PHASE = "step"


def dynamic_inputs(spec: StageSpec) -> list[str]:
    """Inputs with at least one symbolic dim, in the contract's input order."""
    return [t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]


def stage_profile(spec: StageSpec, phase: str | None = None) -> Profile:
    """[(input, min, opt, max)] for the dynamic inputs of a stage in one phase (StageSpec.profile)."""
    return [(name, *spec.profile(name, phase)) for name in dynamic_inputs(spec)]


def stage_profiles(spec: StageSpec) -> list[Profile]:
    """The engine's profiles, index = position in spec.profile_phases ([one] without phases)."""
    return [stage_profile(spec, phase) for phase in spec.profile_phases]


def spanning_profile(spec: StageSpec) -> Profile:
    """ONE profile that admits every phase's shapes (elementwise min / max over the phases), tuned
    for HOT_PHASE: for runtimes that keep a context on profile 0 (ONNX Runtime's TensorRT EP)."""
    profiles = stage_profiles(spec)
    if len(profiles) == 1:
        return profiles[0]
    phases = spec.profile_phases
    hot = profiles[phases.index(HOT_PHASE) if HOT_PHASE in phases else -1]
    out = []
    for i, (name, _, opt, _) in enumerate(hot):
        lo = tuple(map(min, *(p[i][1] for p in profiles)))
        hi = tuple(map(max, *(p[i][3] for p in profiles)))
        out.append((name, lo, opt, hi))
    return out


def profile_index(spec: StageSpec, phase: str | None) -> int:
    """The optimisation profile that serves `phase` (0 for a stage without phases)."""
    phases = spec.profile_phases
    if phase not in phases:
        want = ", ".join(repr(p) for p in phases)
        raise BitDanceError(f"stage {spec.name} has no phase {phase!r} (its profiles serve {want})")
    return phases.index(phase)


def export_profiles(specs: dict[str, StageSpec]) -> dict[str, list[Profile]]:
    """stage -> its profiles, e.g. for manifest_specs(...) of an export directory."""
    return {name: stage_profiles(spec) for name, spec in specs.items()}


def profile_json(profile: Profile) -> list:
    """JSON-ready form (lists) of one profile, for engine-cache keys and sidecars."""
    return [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in profile]


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape))


def shape_strings(profile: Profile) -> tuple[str, str, str]:
    """'name:1x4x8,other:...' for min, opt and max (trtexec and the ORT TensorRT EP read this form)."""
    return tuple(",".join(f"{name}:{_dims(entry[i])}" for name, *entry in profile) for i in range(3))


def multi_shape_strings(profiles: list[Profile]) -> tuple[str, str, str]:
    """Several profiles in the ORT TensorRT EP's form: each input listed once per profile, profile
    k being every input's k-th entry (the EP's ParseProfileShapes collects them in that order)."""
    parts = [shape_strings(p) for p in profiles if p]
    return tuple(",".join(s[i] for s in parts) for i in range(3))


def trtexec_shapes(spec: StageSpec) -> list[str]:
    """trtexec's --minShapes/--optShapes/--maxShapes arguments for a stage (none if fully static):
    one set per profile, in profile order."""
    out = []
    for profile in stage_profiles(spec):
        if profile:
            lo, opt, hi = shape_strings(profile)
            out += [f"--minShapes={lo}", f"--optShapes={opt}", f"--maxShapes={hi}"]
    return out
