"""The vocabulary shard of this tensor-parallel rank and the collectives the vocabulary-parallel
ops share: which columns a shard holds, per-row reductions over the group, row chunks that bound
temporary memory. `group=None` means megatron's tensor-model-parallel group."""

import math

import torch
import torch.distributed as dist

# Elements processed at once inside the fused reductions (4 MiB per fp32 temporary): bounds their
# temporary memory whatever the vocabulary and batch sizes.
CHUNK_ELEMENTS = 2**20


def tp_group(group):
    """`group`, or megatron's tensor-model-parallel group when it is None."""
    if group is not None:
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def shard_range(local_vocab: int, vocab_size: int, group=None):
    """(first global id of this shard, number of real, unpadded columns in it)."""
    start = rank(tp_group(group)) * local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def all_reduce(tensor, op, group):
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor, group):
    """Stack of every rank's `tensor` along a new dim 0 (no autograd)."""
    world = world_size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.stack(out)


def row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def row_reduce(x, op: str, empty_value: float):
    """`x.amin/amax(dim=1)`, or `empty_value` per row when this shard has no columns."""
    if x.shape[1] == 0:
        return x.new_full(x.shape[:1], empty_value)
    return getattr(x, op)(dim=1)


def valid_rows(logits, vocab_size, group):
    """Flatten to rows and keep only the real columns: `(z [N, n_valid], start, n_valid)`."""
    start, n_valid = shard_range(logits.shape[-1], vocab_size, group)
    return logits.reshape(-1, logits.shape[-1])[:, :n_valid], start, n_valid


def row_log_normalizer(z, group):
    """Global log-sum-exp per row of sharded `z [N, n_valid]` (no grad): `[N]`."""
    with torch.no_grad():
        m = row_reduce(z, "amax", -math.inf).float()
        all_reduce(m, dist.ReduceOp.MAX, group)
        s = torch.zeros_like(m)
        for rows in row_chunks(*z.shape):
            s[rows] = (z[rows].float() - m[rows, None]).exp().sum(dim=1)
        all_reduce(s, dist.ReduceOp.SUM, group)
        return m + s.log()
