"""r1's own CPU kernels, compiled on first use with the system C++ compiler and cached.

Built together, each file's top comment saying why it exists and what layout it reads:
`int4_matmul.cpp`, group-wise int4 weights times int8-quantized activations on AVX-512 VNNI;
`decode_attention.cpp`, one-token queries attending to a paged KV cache in place; and
`layer_ops.cpp`, RMSNorm with its residual add and rotary embedding, one call each. `op(name)`
returns `torch.ops.r1.<name>`, or None when this CPU lacks the instructions or the build fails;
the model and r1/quant.py then take PyTorch's portable paths, and the reason is logged once.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# What the kernel's instructions need from the CPU, as /proc/cpuinfo names them.
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
SOURCES = ("int4_matmul.cpp", "decode_attention.cpp", "layer_ops.cpp")
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp"]


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux; empty elsewhere, which selects the portable kernels)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def unavailable_reason() -> str | None:
    """Why r1's kernels cannot run here, or None when they can."""
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        _build()
    except Exception as e:  # no compiler, no ninja, a failed compile: all mean "use the portable kernel"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1])
        return f"building r1/kernels failed: {first_error}"
    return None


@functools.cache
def _kernels_available() -> bool:
    reason = unavailable_reason()
    if reason is not None:
        log.warning("r1's CPU kernels are off (int4 matmuls, decode attention, norms and rotary take PyTorch's "
                    "slower paths) because %s", reason)
    return reason is None


def op(name: str):
    """torch.ops.r1.<name>, or None when r1's kernels cannot run here."""
    return getattr(torch.ops.r1, name) if _kernels_available() else None


@functools.cache
def _build() -> None:
    from torch.utils.cpp_extension import load  # imports setuptools machinery: only when needed

    started = time.perf_counter()
    sources = [str(Path(__file__).with_name(name)) for name in SOURCES]
    print("r1: preparing the CPU kernels (compiled on first use, then cached)", file=sys.stderr, flush=True)
    load(name="r1_kernels", sources=sources, extra_cflags=COMPILER_FLAGS, extra_ldflags=["-fopenmp"],
         is_python_module=False)
    log.info("kernels ready in %.1f s", time.perf_counter() - started)
