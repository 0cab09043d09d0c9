"""Token selection of REOPOLD and Entropy-OPD: which on-policy tokens get the loss, decided over
the whole global batch (every data-parallel rank), so the choice does not depend on how the batch
is split into micro-batches or ranks.

- `entropy-opd` and `reopold`, and `reopold-2stage` from `--reopold-stage2-step` on (refinement):
  the top fraction of tokens by the student's entropy at sampling (token-level dynamic sampling).
- `reopold-2stage` before it (exploration): every token whose reward `A = lp_T - lp_S_old` is
  above the clip floor `c = log(l / (1 - l))`, no fraction.

REOPOLD averages its loss over the selected tokens (`counts_selected`), Entropy-OPD over every
response token. Our reading of the REOPOLD paper (arXiv 2603.11137) is in docs/METHODS.md.
"""

import math

import torch
import torch.distributed as dist

from megatron_tropd.distill.losses import DistillConfig
from megatron_tropd.tokens import TokenRecord


def counts_selected(config: DistillConfig) -> bool:
    """Whether the method's token-mean is over the selected tokens (REOPOLD's objective)."""
    return config.method in ("reopold", "reopold-2stage")


def select_tokens(config: DistillConfig, step: int, record: TokenRecord, group=None):
    """`[N]` bool: the on-policy tokens `config.method` trains on at `step` (`group`: the
    data-parallel group the ranking spans, None for this process only)."""
    if config.method == "reopold-2stage" and step < config.reopold_stage2_step:
        advantage = record.teacher_logprobs - record.old_logprobs
        return record.on_policy & (advantage > config.clip_floor)
    fraction = config.entropy_opd_fraction if config.method == "entropy-opd" else \
        config.reopold_fraction
    return top_fraction_mask(record.student_entropy, record.on_policy, fraction, group)


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
