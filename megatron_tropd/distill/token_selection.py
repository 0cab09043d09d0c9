"""Token selection of REOPOLD and Entropy-OPD: train on a fraction of the tokens, ranked over the
whole global batch (every data-parallel rank), so the choice does not depend on how the batch is
split into micro-batches or ranks.

REOPOLD's two stages (our reading of arXiv 2603.11137, documented in docs/METHODS.md): before
`reopold_stage2_step` tokens are ranked by the magnitude of their clipped reward |max(A, c)| (near-
zero credit is redundant), from then on by the student's entropy. Entropy-OPD ranks by entropy.
"""

import math

import torch
import torch.distributed as dist

from megatron_tropd.distill.losses import DistillConfig


def selection_scores(config: DistillConfig, step: int, advantage, student_entropy):
    """The per-token score a method ranks by (higher is kept)."""
    if config.method == "reopold" and step < config.reopold_stage2_step:
        return advantage.clamp(min=config.clip_floor).abs()
    return student_entropy


def selection_fraction(config: DistillConfig) -> float:
    return config.reopold_fraction if config.method == "reopold" else config.entropy_opd_fraction


def top_fraction_mask(scores, mask, fraction: float, group=None):
    """`mask` restricted to the `ceil(fraction * n)` highest-scoring of its n tokens over the whole
    `group` (ties with the last kept score are kept too).

    Args:
        scores: `[...]` per-token scores; mask: `[...]` bool, the candidate tokens.
        group: the data-parallel group (None: this process only).
    """
    values = scores[mask].float()
    if group is not None and dist.get_world_size(group) > 1:
        values = _all_gather_variable(values, group)
    if values.numel() == 0:
        return mask.clone()
    k = max(1, math.ceil(fraction * values.numel()))
    threshold = values.topk(k).values[-1]
    return mask & (scores.float() >= threshold)


def _all_gather_variable(values, group):
    """Concatenation of every rank's 1-D `values` (lengths may differ)."""
    world = dist.get_world_size(group)
    count = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])
