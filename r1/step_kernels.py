"""The kernels a GPU decode step launches, counted on a CPU.

A GPU's profiler counts CUDA kernels. A CPU has none, but it can run the GPU's code path: r1's
Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported),
and every PyTorch op through the dispatcher, where a TorchDispatchMode sees each aten op. An aten
op that computes is a kernel on a GPU; views, allocations and metadata are none (NO_KERNEL). So
the count is what a step launches on a GPU, give or take what cuBLAS splits (a matmul's
split-K reduction) or PyTorch fuses; bench/gpu.py puts the profiler's count beside it.

`decode_step_kernels` routes one batch-1 decode step of a model to the GPU path: the layer ops
to Triton (`layer_ops=True`, gpu_layer_ops.py) or to PyTorch (the GPU's default until measured),
attention to the paged Triton kernel, as r1/model picks them for CUDA tensors.
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from r1 import kernels
from r1.model import attention
from r1.model.attention import AttentionMetadata, allocate_kv_cache
from r1.model.qwen2 import Qwen2ForCausalLM

# Aten ops that launch nothing on a GPU: views, allocations, metadata.
NO_KERNEL = {
    "alias",
    "as_strided",
    "chunk",
    "detach",
    "detach_",
    "empty",
    "empty_like",
    "empty_strided",
    "expand",
    "lift_fresh",
    "permute",
    "_reshape_alias",
    "select",
    "slice",
    "split",
    "split_with_sizes",
    "squeeze",
    "t",
    "transpose",
    "unbind",
    "unsqueeze",
    "_unsafe_view",
    "view",
}
# Ops that copy only when they must (a dtype change, a layout no view can give): a kernel then.
MAY_ALIAS = {"contiguous", "reshape", "to"}


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not (name in MAY_ALIAS and _same_storage(out, args[0])):
            self.counts[f"aten.{name}"] += 1
        return out


def _same_storage(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@contextmanager
def gpu_path(layer_ops: bool):
    """Route CPU tensors through the ops r1's model takes for CUDA tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from r1.kernels import gpu_layer_ops, paged_decode

    if not isinstance(gpu_layer_ops._add_rms_norm, InterpretedFunction):
        raise RuntimeError("the GPU path runs on a CPU under Triton's interpreter: set TRITON_INTERPRET=1 first")
    ops = gpu_layer_ops.OPS if layer_ops else {}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(kernels, "op_for", lambda name, x: ops.get(name)))
        stack.enter_context(
            mock.patch.object(attention, "triton_decode_runs", lambda device, head_dim: paged_decode.supports(head_dim))
        )
        yield


@contextmanager
def counting(counts: Counter):
    """Count into `counts` each aten op that computes and each Triton launch ("triton.<kernel>");
    what the interpreter does inside a launch is not counted."""
    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def counted_launch(self, *args, **kwargs):
        counts[f"triton.{self.fn.__name__}"] += 1
        with _disable_current_modes():
            return launch(self, *args, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", counted_launch), _AtenCounter(counts):
        yield


@torch.inference_mode()
def decode_step_kernels(model: Qwen2ForCausalLM, layer_ops: bool, context: int = 64, block_size: int = 16) -> Counter:
    """The kernels of one batch-1 decode step at `context` tokens (the model's forward, then its
    lm_head), by name, after a step that warms up what is computed once. The cache holds random
    keys and values: counts do not depend on them."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    num_blocks = -(-context // block_size)
    kv_cache = allocate_kv_cache(
        cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu"
    )
    kv_cache.normal_()
    # The sequence holds blocks 0, 1, ... in order, so its new token's cache slot is its position.
    position = context - 1
    table = torch.arange(num_blocks).unsqueeze(0)
    meta = AttentionMetadata.for_decode(torch.tensor([position]), table, torch.tensor([context]), block_size)
    counts: Counter = Counter()
    with gpu_path(layer_ops):
        for counted in (False, True):  # the first step is a warm-up: what is computed once, is
            with counting(counts) if counted else nullcontext():
                hidden = model(torch.tensor([7]), torch.tensor([position]), kv_cache, meta)
                model.compute_logits(hidden)
    return counts
