"""Which of ONNX Runtime's CPU integer kernels give exact INT8 products on this CPU, and the switch.

ONNX Runtime runs our signed int8 Q/DQ graphs on x86 as uint8 activations x int8 weights (U8S8),
and those kernels saturate on x86 CPUs without VNNI, AVX-VNNI or AMX (`u8s8_saturates`): that is
what turned the INT8 digits into a checkerboard on an AVX2-only EPYC (Zen 3). There, and only
there, sessions get ONNX Runtime's own `session.x64quantprecision=1` (`configure`), which runs its
exact U8U8 kernels: on a VNNI CPU U8U8 is slower and U8S8 is exact. It changes no file: one INT8
variant serves TensorRT (which reads signed, symmetric Q/DQ), ONNX Runtime on every CPU, and a
copy moved to another machine, because the kernels are chosen where the session is made, from the
CPU it runs on. Why this and not 7-bit weights (reduce_range), with the measurements that chose
it: docs/precision.md "INT8 on every CPU"; the speed: docs/benchmarks.md "INT8 on both kinds of CPU".
"""

from __future__ import annotations

import functools
import os
import platform

from ..errors import BitDanceError

ENV = "BITDANCE_RT_INT8_KERNELS"
MODES = ("auto", "exact", "fast")
SESSION_KEY = "session.x64quantprecision"
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")  # any of these: ONNX Runtime's U8S8 kernels are exact


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def _detected() -> tuple[tuple[str, bool], ...]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as found
    flags = _proc_flags()
    return (
        ("avx2", bool(found.get("AVX2"))),
        ("avx512_vnni", bool(found.get("AVX512VNNI"))),
        ("avx_vnni", "avx_vnni" in flags),
        ("amx_int8", "amx_int8" in flags),
    )


def cpu_features() -> dict[str, bool]:
    """The CPU features that decide the int8 kernels: numpy's cpuid probe (what the running code
    sees, on every OS), plus /proc/cpuinfo for AVX-VNNI and AMX, which numpy does not name.
    Read once per process (the CPU does not change under it)."""
    return dict(_detected())


def u8s8_saturates(machine: str | None = None, features: dict | None = None) -> bool:
    """True where ONNX Runtime's U8S8 kernels saturate: an x86 CPU with none of VNNI / AVX-VNNI / AMX.

    Without VNNI the U8S8 kernels multiply with VPMADDUBSW, which adds each pair of u8 x s8 products
    into a signed 16-bit lane and saturates: with activations and weights both near full range a
    pair (up to 2 x 255 x 127 = 64,770) is clamped to 32,767. With AVX512-VNNI, AVX-VNNI or AMX the
    kernels sum into 32 bits (VPDPBUSD / tiles): exact. ARM's kernels (UDOT/SDOT/UMMLA, or NEON
    widening to 16 then 32 bits) are exact too. Sources: ONNX Runtime's quantisation guide ("When and
    why do I need to try U8U8?") and its MLAS dispatch (core/mlas/lib/platform.cpp)."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return False
    f = cpu_features() if features is None else features
    return not any(f.get(name) for name in _EXACT_U8S8)


def resolve(mode: str | None = None) -> bool:
    """Whether INT8 sessions run on the exact U8U8 kernels: `mode` (or $BITDANCE_RT_INT8_KERNELS)
    'exact' always, 'fast' never (U8S8: wrong where it saturates, for measurement only), 'auto'
    (default) where the U8S8 kernels saturate."""
    mode = mode or os.environ.get(ENV) or "auto"
    if mode not in MODES:
        raise BitDanceError(f"INT8 kernels {mode!r} ({ENV} or int8_kernels): use one of {', '.join(MODES)}")
    return mode == "exact" or (mode == "auto" and u8s8_saturates())


def configure(session_options, exact: bool) -> None:
    """Ask ONNX Runtime for its exact U8U8 kernels on `session_options` (when `exact`): when the
    session is made, it rewrites each int8 weight as uint8 (w + 128, the zero point moved with it: the
    same products) and runs the U8U8 kernels, which widen both operands to 16 bits before
    multiplying and sum in 32."""
    if exact:
        session_options.add_session_config_entry(SESSION_KEY, "1")


def cpu_summary() -> str:
    """This CPU as far as int8 kernels go, e.g. 'x86_64 AVX2 without VNNI' (recorded in INT8 manifests)."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return machine
    f = cpu_features()
    have = [name for name in _EXACT_U8S8 if f[name]]
    return f"{machine} with {'/'.join(have)}" if have else f"{machine} {'AVX2' if f['avx2'] else 'SSE'} without VNNI"


def kernels_note(exact: bool) -> str:
    """What an INT8 session runs on, for the line a command prints."""
    cpu = cpu_summary()
    if exact:
        return f"INT8 on ONNX Runtime's U8U8 kernels (exact; {cpu})"
    if u8s8_saturates():
        return f"INT8 on U8S8 kernels, which saturate on this CPU ({cpu}): results are wrong ({ENV}=fast)"
    return f"INT8 on exact int8 kernels ({cpu})"
