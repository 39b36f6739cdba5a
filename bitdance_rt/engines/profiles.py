"""TensorRT optimisation profiles, derived only from the stage contract.

An engine with dynamic dims needs min/opt/max shapes for each dynamic input; if they came from
anywhere but bitdance_rt.stages, an engine could be built for batch sizes the runtime never
asks for (or refuse those it does). Inputs with fully static shapes need no profile entry.
The result is plain data (names and int tuples): the builder passes each entry to
IOptimizationProfile.set_shape, the engine cache hashes it, trtexec gets it as strings.
"""

from __future__ import annotations

from ..stages import StageSpec

Shape = tuple[int, ...]
Profile = list[tuple[str, Shape, Shape, Shape]]  # (input name, min, opt, max), in input order


def dynamic_inputs(spec: StageSpec) -> list[str]:
    """Inputs with at least one symbolic dim, in the contract's input order."""
    return [t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]


def stage_profile(spec: StageSpec) -> Profile:
    """[(input, min, opt, max)] for the dynamic inputs of a stage (StageSpec.profile of each)."""
    return [(name, *spec.profile(name)) for name in dynamic_inputs(spec)]


def export_profiles(specs: dict[str, StageSpec]) -> dict[str, Profile]:
    """stage -> profile, e.g. for manifest_specs(...) of an export directory."""
    return {name: stage_profile(spec) for name, spec in specs.items()}


def profile_json(profile: Profile) -> list:
    """JSON-ready form (lists), for engine-cache keys and sidecars."""
    return [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in profile]


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape))


def shape_strings(profile: Profile) -> tuple[str, str, str]:
    """'name:1x4x8,other:...' for min, opt and max (trtexec and the ORT TensorRT EP read this form)."""
    return tuple(",".join(f"{name}:{_dims(entry[i])}" for name, *entry in profile) for i in range(3))


def trtexec_shapes(spec: StageSpec) -> list[str]:
    """trtexec's --minShapes/--optShapes/--maxShapes arguments for a stage (none if fully static)."""
    profile = stage_profile(spec)
    if not profile:
        return []
    lo, opt, hi = shape_strings(profile)
    return [f"--minShapes={lo}", f"--optShapes={opt}", f"--maxShapes={hi}"]
