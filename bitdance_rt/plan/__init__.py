"""`bitdance-rt plan`: what a model needs before it is loaded. memory.py: the runtime (weights per stage at a
precision, found by tracing the model on the meta device, KV cache, activations, TensorRT workspace) and
which GPUs / Jetsons it fits; road.py: each step of getting there (load, export, derive, calibrate,
build, run) and whether a machine has what it needs; preflight.py: the one-line refusal of a command
that needs more host memory than the machine has."""

from .memory import (
    BROADCASTS,
    GIB,
    PLAN_BACKENDS,
    SHAPED,
    TARGETS,
    UNFOLDED,
    MemoryPlan,
    StageMemory,  # noqa: F401
    _meta_model,
    _trace,
    activation_bytes,
    activation_phases,
    distinct_bytes,
    export_stages,
    format_plan,
    kv_cache_bytes,
    loaded_stages,
    plan,
    shared_weights,
    stage_memory,
    stage_tensors,
    stage_weights,
    tensor_bytes,
)
