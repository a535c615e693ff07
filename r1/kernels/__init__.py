"""r1's own CPU kernels, compiled on first use with the system C++ compiler and cached.

Each file's top comment says why it exists and what layout it reads: `int4_matmul.cpp`,
group-wise int4 weights times int8-quantized activations; `int6_matmul.cpp`, the same for 6-bit
weights in Q6_K's structure (`matmul_tiles.h` holds what the two share); `int4_quantize.cpp`, the grid each
group of weights is quantized to; `decode_attention.cpp`, one-token
queries attending to a paged KV cache in place; `layer_ops.cpp`, RMSNorm with its residual add,
rotary embedding, int8 KV cache writes and SwiGLU, one call each; `softmax_topk.cpp`, the
likeliest tokens a sampler draws from, and the draw among them; `decode_step.cpp`, a whole
decode step calling those ops from C++ (`ops.h` declares them; r1/model/cpu_decode.py builds it,
and `cpu_class` hands out its classes); `vec.h`, the vector operations they share. They are
compiled together for the widest instruction set this CPU has (BUILDS: AMX, which only int4_matmul
uses past 32 rows; else AVX-512 VNNI; else AVX2); a build the compiler fails on gives way to the
next; how far ahead the weight kernels prefetch is set per CPU (`prefetch_bytes`). `op(name)`
returns `torch.ops.r1.<name>`, or None when this build lacks it, the CPU has none of the
instruction sets, or every build fails; the model and r1/quant.py then take PyTorch's portable
paths, and the reason is logged once.

Two files here are for GPUs, in Triton (tests run them on a CPU under Triton's interpreter):
`paged_decode.py`, decode attention, which r1/model/attention.py imports only on a GPU, and
`gpu_layer_ops.py`, the norm, rotary and SwiGLU ops of layer_ops.cpp, which op_for hands out for
CUDA tensors when asked for (opt-in until a GPU run has measured them; see that file), with
`paged_prefill.py`'s attention of a prefill or mixed step in one call, under the same switch.

Which kernels run is chosen once, when a model is built (`select`, from EngineConfig's
cpu_kernels and gpu_layer_ops; $R1_KERNELS and $R1_GPU_LAYER_OPS override it), and `plan` says
which implementation each op gets on a device and dtype, and why: the engine records it with its
settings. The choice is the process's: torch.ops.r1 holds the one build loaded first.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    """One way to compile the kernels: what it needs from the CPU (as /proc/cpuinfo names it)
    and the compiler's flags."""

    name: str
    cpu_flags: tuple[str, ...]
    compiler_flags: tuple[str, ...]


BUILDS = (  # widest first: a CPU takes the first whose flags it has and that compiles
    Build(
        "avx512_amx",
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"),
        (
            "-O3",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512vnni",
            "-mavx512bf16",
            "-mamx-tile",
            "-mamx-bf16",
            "-fopenmp",
        ),
    ),
    Build(
        "avx512_vnni",
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp"),
    ),
    Build("avx2", ("avx2", "fma", "f16c"), ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")),
)
# Every build compiles every source (vec.h holds the vector operations they share); each source's ops.
OPS = {
    "int4_matmul.cpp": ("int4_matmul",),
    "int6_matmul.cpp": ("int6_matmul",),
    "int4_quantize.cpp": ("int4_quantize",),
    "decode_attention.cpp": ("decode_attention",),
    "layer_ops.cpp": ("add_rms_norm", "rotary_", "write_kv_int8_", "silu_mul"),
    "softmax_topk.cpp": ("softmax_topk", "filter_draw"),
    "decode_step.cpp": (),  # no ops: the classes Linear and DecodeStack (cpu_class)
}
# Ops that only the GPU's Triton files have (the CPU's write_kv_int8_ quantizes, which
# rotary_write_kv_ does not; paged_prefill.py's attention of a whole step).
GPU_ONLY_OPS = ("rotary_write_kv_", "prefill_attention")
# Names one build (R1_KERNELS=avx2 on an AVX-512 machine: the tests check that build there), or
# "off" for PyTorch's paths everywhere (to compare, or to rule the kernels out); overrides select().
BUILD_ENV = "R1_KERNELS"
# Bytes the weight kernels prefetch ahead, 0 for none; overrides prefetch_bytes()'s choice for this CPU.
PREFETCH_ENV = "R1_PREFETCH_BYTES"
# "on" runs the layer ops of CUDA tensors on r1's Triton kernels, anything else PyTorch's; overrides select().
GPU_OPS_ENV = "R1_GPU_LAYER_OPS"


@dataclass(frozen=True)
class Selection:
    cpu_kernels: str = "auto"  # of options.CPU_KERNELS (EngineConfig checks it): auto is the widest build here
    gpu_layer_ops: bool = False


_selected = Selection()


def select(cpu_kernels: str = "auto", gpu_layer_ops: bool = False) -> Selection:
    """Choose the kernels a model built next runs on; what the environment says wins."""
    global _selected
    _selected = Selection(cpu_kernels, gpu_layer_ops)
    _available_ops.cache_clear()  # the environment may have changed too
    _gpu_ops.cache_clear()
    return Selection(_wanted_build() or "auto", _gpu_layer_ops_on())


def _wanted_build() -> str | None:
    """The build asked for ($R1_KERNELS, else the selection), or None for the widest that runs."""
    wanted = os.environ.get(BUILD_ENV, _selected.cpu_kernels)
    return None if wanted == "auto" else wanted


def _gpu_layer_ops_on() -> bool:
    env = os.environ.get(GPU_OPS_ENV)
    return _selected.gpu_layer_ops if env is None else env == "on"


def prefetch_bytes() -> int:
    """How far ahead the weight kernels ask for weights (matmul_tiles.h), set at build time: none
    on AMD's family 25 (Zen 4), whose hardware prefetcher streams int4's weights 5-7% and int6's
    15-20% faster without the instructions (docs/performance.md); 4 KB on every other CPU.
    $R1_PREFETCH_BYTES overrides it (to measure another CPU both ways)."""
    if PREFETCH_ENV in os.environ:
        return int(os.environ[PREFETCH_ENV])
    fields = cpuinfo_fields()
    return 0 if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25" else 4096


def cpuinfo_fields(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first CPU's lines of /proc/cpuinfo, by name (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux; empty elsewhere, which selects the portable kernels)."""
    return set(cpuinfo_fields().get("flags", "").split())


def this_cpus_builds() -> list[Build]:
    """The builds this CPU can run, widest first (or the one asked for)."""
    flags, wanted = cpu_flags(), _wanted_build()
    return [b for b in BUILDS if wanted in (None, b.name) and all(f in flags for f in b.cpu_flags)]


def this_cpus_build() -> Build | None:
    """The widest build this CPU can run, or None when it has none's flags."""
    return next(iter(this_cpus_builds()), None)


def running_build() -> Build | None:
    """The build that runs here: the widest this CPU can run that compiles (a compiler too old
    for AMX still gets the VNNI build), or None."""
    return next((b for b in this_cpus_builds() if _build(b) is None), None)


def unavailable_reason() -> str | None:
    """Why r1's kernels cannot run here, or None when they can."""
    wanted = _wanted_build()
    source = f"{BUILD_ENV}={wanted}" if BUILD_ENV in os.environ else f"cpu_kernels={wanted}"
    if wanted == "off":
        return source
    if wanted is not None and wanted not in (b.name for b in BUILDS):
        return f"{source} names none of their builds ({', '.join(b.name for b in BUILDS)})"
    builds = this_cpus_builds()
    if not builds:
        needs = "; ".join(
            f"{b.name} needs {', '.join(f for f in b.cpu_flags if f not in cpu_flags())}"
            for b in BUILDS
            if wanted in (None, b.name)
        )
        return f"this CPU has no build of them ({needs})"
    if running_build() is None:
        return "building r1/kernels failed: " + "; ".join(f"{b.name}: {_build(b)}" for b in builds)
    return None


@functools.cache
def _available_ops() -> frozenset[str]:
    """The ops this CPU's build has (none when it cannot run), worked out once: op() runs ~200
    times a decode step, and finding the build reads /proc/cpuinfo."""
    reason = unavailable_reason()
    if reason is not None:
        log.warning(
            "r1's CPU kernels are off (int4 quantizing and matmuls, decode attention, norms, rotary, "
            "int8 cache writes, SwiGLU and sampling take PyTorch's slower paths) because %s",
            reason,
        )
        return frozenset()
    return frozenset(name for names in OPS.values() for name in names)


def op(name: str):
    """torch.ops.r1.<name>, or None when it cannot run here."""
    return getattr(torch.ops.r1, name) if name in _available_ops() else None


def cpu_class(name: str):
    """torch.classes.r1.<name> (decode_step.cpp's Linear, DecodeStack), or None when r1's CPU
    kernels cannot run here."""
    return getattr(torch.classes.r1, name) if _available_ops() else None


def op_for(name: str, x: torch.Tensor):
    """The kernel for `name` that takes x, or None: r1's CPU kernels take float32 CPU tensors,
    its Triton ones (gpu_layer_ops.py) CUDA tensors of any float dtype."""
    if x.device.type == "cuda":
        return _gpu_ops().get(name)
    return op(name) if x.device.type == "cpu" and x.dtype == torch.float32 else None


def plan(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Each op's implementation for a model on device in dtype: "r1 <build>", "triton", or
    "pytorch" and why; the rule op_for applies to every call. Decode attention on a GPU is
    r1/model/attention.py's choice (Triton's paged kernel where it runs)."""
    names = [name for names in OPS.values() for name in names]
    if device.type == "cuda":
        why = "the layer ops are off" if not _gpu_layer_ops_on() else "triton is not installed"
        return {
            name: "triton" if name in _gpu_ops() else f"pytorch ({why})"
            for name in (*names, *GPU_ONLY_OPS)
            if name
            not in ("int4_matmul", "int6_matmul", "int4_quantize", "softmax_topk", "filter_draw", "decode_attention")
        }
    reason = unavailable_reason()
    if reason is not None:
        return dict.fromkeys(names, f"pytorch ({reason})")
    floats_only = "pytorch (r1's kernels take float32)"
    return {
        name: f"r1 {running_build().name}"
        if dtype == torch.float32 or name.startswith(("int4", "int6"))
        else floats_only
        for name in names
    }


@functools.cache
def _gpu_ops() -> dict:
    """gpu_layer_ops.OPS when the layer ops are on and Triton is installed, else nothing."""
    if not _gpu_layer_ops_on() or importlib.util.find_spec("triton") is None:
        return {}
    from r1.kernels import gpu_layer_ops, paged_prefill  # import Triton: only for CUDA tensors

    return {**gpu_layer_ops.OPS, "prefill_attention": paged_prefill.paged_prefill_attention}


@functools.cache
def _build(build: Build) -> str | None:
    """Compile and load one build (once a process); None, or the compiler's first error line."""
    from torch.utils.cpp_extension import load  # imports setuptools machinery: only when needed

    started = time.perf_counter()
    sources = [str(Path(__file__).with_name(name)) for name in OPS]
    print(
        f"r1: preparing the CPU kernels for {build.name} (compiled on first use, then cached)",
        file=sys.stderr,
        flush=True,
    )
    try:
        load(
            name=f"r1_kernels_{build.name}",
            sources=sources,
            extra_cflags=[*build.compiler_flags, f"-DR1_PREFETCH_BYTES={prefetch_bytes()}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed compile: all mean "use the portable kernel"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return next((line for line in lines if "error" in line.lower()), lines[-1])
    log.info("kernels ready in %.1f s", time.perf_counter() - started)
    return None
