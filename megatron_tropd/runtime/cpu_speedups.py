"""The CPU-only speed-ups, in one place: each changes how fast a CPU host computes, never what it
computes, and a GPU run never takes it. They exist because CI, the tests and every laptop run on
two CPU cores (their measurements: docs/PERFORMANCE.md).

- `DecodeLinear`: a generation step's weight products through MKL's packed GEMM (the KV-cache
  layers, `rollout.kv_cache`).
- `fuse_cpu_adam`: torch's fused CPU Adam(W) kernel for megatron's optimiser when neither apex nor
  TransformerEngine supplies one (`run_setup`).

Both call torch's CPU kernels directly (`torch.ops.mkl`, `fused=True`); no other module does.
"""

import torch
import torch.nn.functional as F

_HAS_MKL_PACKED_GEMM = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl,
                                                                       "_mkl_reorder_linear_weight")


class DecodeLinear:
    """A linear layer's `[out, in]` weight as the products of a `generate` call use it:
    `x [..., in]` -> `x W^T [..., out]`.

    On a CPU with MKL a float32 weight is packed once per call for products of `rows` rows (MKL's
    packed GEMM, the format torch's own CPU compiler uses for linear layers): a decode step's
    product of a few rows with a weight read from memory is faster that way than with the plain
    `[out, in]` weight or a row-major copy, and packing costs less than a transposed copy
    (docs/PERFORMANCE.md, "Decode products through MKL's packed GEMM"). Products of another row
    count (the prefill) use the plain weight, as do other dtypes and every device without MKL. The
    weights change between calls, not during one.
    """

    def __init__(self, weight, rows: int):
        self.weight = weight.detach()
        self.rows = rows
        packs = (_HAS_MKL_PACKED_GEMM and self.weight.device.type == "cpu"
                 and self.weight.dtype == torch.float32)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows) if packs else None

    def __call__(self, x):
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.rows)


def fuse_cpu_adam(optimizer):
    """Without apex or TransformerEngine megatron-core steps with torch's Adam(W), which for CPU
    tensors picks neither its foreach nor its fused implementation but a Python loop of about ten
    elementwise ops per parameter tensor; its fused CPU kernel makes one pass per tensor (the
    speed-up: docs/PERFORMANCE.md, "Step profile"). GPU runs keep megatron's choice."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        if isinstance(inner, torch.optim.Adam) and all(p.device.type == "cpu" for p in params):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)
