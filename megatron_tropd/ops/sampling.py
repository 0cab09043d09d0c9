"""Sampling from vocabulary-sharded logits: greedy, temperature, top-k, top-p, never gathering
the vocabulary.

Inverse-CDF sampling: one uniform u per row, drawn from the row's key, picks the first id, in global
id order, at which the cumulative probability exceeds u. Each rank sums its own shard's mass
(relative to its own maximum logit) and one (maximum, mass) pair per row is all-gathered, so every
rank knows which shard holds the draw; that shard finds the id in its own cumulative sum, and the
ids are all-reduced. The draw depends on (row key, the distribution) only, not on how the
vocabulary is sharded: the same keys give the same ids at TP=1, 2, 4 (up to float64 rounding of
the cumulative sums, which could move a draw within about 1e-16 of a boundary between two ids).
"""

import math

import torch
import torch.distributed as dist

from megatron_tropd.ops.shards import (all_gather, all_reduce, rank, row_log_normalizer, row_reduce,
                                       tp_group, valid_rows, world_size)
from megatron_tropd.ops.vocab_parallel import topk_rows


def _inverse_cdf(z, start: int, u, group):
    """One global id per row of sharded scores `z [N, n]` (float64; -inf = excluded), drawn from
    softmax(z) by the uniforms `u [N]`: the first id whose cumulative probability exceeds u."""
    n_rows, n = z.shape
    top = torch.full((n_rows,), -math.inf, dtype=z.dtype, device=z.device)  # -inf: no mass here
    shift = mass = torch.zeros(n_rows, dtype=z.dtype, device=z.device)
    if n > 0:
        top = z.max(dim=1).values
        shift = torch.where(torch.isfinite(top), top, 0.0)
        cumulative = (z - shift[:, None]).exp().cumsum(dim=1)
        mass = cumulative[:, -1]
    if world_size(group) == 1:
        local = u * mass  # one shard holds the whole vocabulary
    else:
        local, mine = _draw_in_shard(top, shift, mass, u, group)
    # strictly below the shard's total, so the first id above it has probability > 0
    local = torch.minimum(local, torch.nextafter(mass, torch.zeros_like(mass)))
    ids = torch.full((n_rows,), -1, dtype=torch.long, device=z.device)
    if n > 0:
        ids = torch.searchsorted(cumulative, local[:, None], right=True)[:, 0] + start
    if world_size(group) == 1:
        return ids
    return all_reduce(torch.where(mine, ids, -1), dist.ReduceOp.MAX, group)


def _draw_in_shard(top, shift, mass, u, group):
    """Which shard holds each row's draw, and where in that shard's cumulative mass (in its own
    units `exp(z - shift)`): `(position [N], this shard holds it [N] bool)`. From one all-gather
    of every shard's (largest score, mass) per row."""
    tops, masses = all_gather(torch.stack([top, mass]), group).unbind(1)  # [world, N] each
    largest = tops.max(dim=0).values
    masses = masses * (tops - largest).exp()  # every shard's mass on one scale
    edges = masses.cumsum(dim=0)  # the same on every rank: it is made of all-gathered values
    target = u.to(masses.dtype) * edges[-1]
    # the shard holding the draw: the first whose upper edge exceeds it (a draw that rounding put
    # at the very top goes to the last shard with any mass)
    owner = (edges <= target).sum(dim=0)
    last_with_mass = masses.shape[0] - 1 - (masses > 0).flip(0).int().argmax(dim=0)
    owner = torch.minimum(owner, last_with_mass)
    below = torch.where(owner > 0, edges.gather(0, (owner - 1).clamp(min=0)[None])[0], 0.0)
    local = ((target - below) * (largest - shift).exp()).clamp(min=0.0)
    return local, owner == rank(group)


def _global_argmax(scores, start: int, group):
    """Global argmax id per row of sharded `scores [N, n]`; ties go to the smallest id."""
    n_rows = scores.shape[0]
    if scores.shape[1] > 0:
        best, where = scores.max(dim=1)
        best_id = where + start
    else:
        best = torch.full((n_rows,), -math.inf, dtype=scores.dtype, device=scores.device)
        best_id = torch.zeros(n_rows, dtype=torch.long, device=scores.device)
    all_best, all_ids = all_gather(best, group), all_gather(best_id, group)
    top = all_best.max(dim=0).values
    return all_ids.masked_fill(all_best != top, torch.iinfo(torch.long).max).min(dim=0).values


def _nucleus_floor(lp, top_p: float, group, max_iters: int = 64):
    """Per row, the largest log-prob threshold t with Σ_{lp_v >= t} p_v >= top_p: keeping
    `lp >= t` keeps the smallest most-probable set of mass >= top_p (the boundary token included).
    Found by bisection on all-reduced masses, so the vocabulary is never sorted or gathered."""
    p = lp.exp()
    finite = torch.isfinite(lp)
    lo = row_reduce(torch.where(finite, lp, math.inf), "amin", math.inf)
    hi = row_reduce(torch.where(finite, lp, -math.inf), "amax", -math.inf)
    all_reduce(lo, dist.ReduceOp.MIN, group)
    all_reduce(hi, dist.ReduceOp.MAX, group)
    hi = hi + 1.0  # mass(lp >= hi) = 0 < top_p; mass(lp >= lo) = 1 >= top_p
    for _ in range(max_iters):
        mid = (lo + hi) / 2
        mass = all_reduce(torch.where(lp >= mid[:, None], p, 0.0).sum(dim=1), dist.ReduceOp.SUM,
                           group)
        enough = mass >= top_p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
        if (hi - lo).max() < 1e-12:  # identical on every rank: all inputs were all-reduced
            break
    return lo


@torch.no_grad()
def sample(logits, vocab_size: int, uniforms, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, group=None):
    """Sample one global id per row from sharded logits, never gathering the vocabulary.

    Args:
        logits: this rank's shard `[..., Vl]`.
        uniforms: float64 `[...]` in (0, 1), one draw per row, the same on every rank (see
            `uniform_from_keys`); the same draws give the same ids whatever the tensor-parallel
            size. Unused when greedy.
        temperature: 0 means greedy (argmax, ties to the smallest id).
        top_k: keep only the k most likely ids (0 = all).
        top_p: keep the smallest most-likely set of probability >= top_p (1.0 = all).
    The settings are checked once, by `rollout.generate.check_sampling`.
    Returns: global ids `[...]` (int64).
    """
    group = tp_group(group)
    z, start, n_valid = valid_rows(logits, vocab_size, group)
    if temperature == 0:
        return _global_argmax(z, start, group).view(logits.shape[:-1])
    z = z.double() if temperature == 1.0 else z.double() / temperature
    if 0 < top_k < vocab_size:
        kth = topk_rows(z, start, top_k, group)[0][:, -1]
        z = z.masked_fill(z < kth[:, None], -math.inf)  # ties with the k-th value are kept
    if top_p < 1.0:
        lp = z - row_log_normalizer(z, group)[:, None].double()
        z = z.masked_fill(lp < _nucleus_floor(lp, top_p, group)[:, None], -math.inf)
    return _inverse_cdf(z, start, uniforms.reshape(-1).to(z.device), group).view(logits.shape[:-1])
