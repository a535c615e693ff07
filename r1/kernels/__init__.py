"""r1's own CPU kernels, compiled on first use with the system C++ compiler and cached.

Today one: `int4_matmul.cpp`, group-wise int4 weights times int8-quantized activations on
AVX-512 VNNI (see the comment at its top for why and for the layout). `int4_matmul_op()` returns
the op, or None when this CPU lacks the instructions or the build fails; r1/quant.py then uses
PyTorch's portable int4 kernel and the reason is logged once.
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


def int4_unavailable_reason() -> str | None:
    """Why the VNNI int4 kernel cannot run here, or None when it can."""
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        _build()
    except Exception as e:  # no compiler, no ninja, a failed compile: all mean "use the portable kernel"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1])
        return f"building r1/kernels/int4_matmul.cpp failed: {first_error}"
    return None


@functools.cache
def int4_matmul_op():
    """torch.ops.r1.int4_matmul, or None (the reason logged once) when it cannot run here."""
    reason = int4_unavailable_reason()
    if reason is not None:
        log.warning("int4: using PyTorch's portable kernel (slower) because %s", reason)
        return None
    return torch.ops.r1.int4_matmul


@functools.cache
def _build() -> None:
    from torch.utils.cpp_extension import load  # imports setuptools machinery: only when needed

    started = time.perf_counter()
    source = Path(__file__).with_name("int4_matmul.cpp")
    print("r1: preparing the int4 CPU kernel (compiled on first use, then cached)", file=sys.stderr, flush=True)
    load(name="r1_kernels", sources=[str(source)], extra_cflags=COMPILER_FLAGS, extra_ldflags=["-fopenmp"],
         is_python_module=False)
    log.info("int4 kernel ready in %.1f s", time.perf_counter() - started)
