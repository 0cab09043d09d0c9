"""Student-side per-token quantities, computed vocabulary-parallel from the student's sharded
logits, joined with the teacher's signals into the `TokenInputs` a loss reads.

Only what `losses.needs(config)` asks for is computed: the token log-prob always, the student's
log-probs at the teacher's top-k ids for FKL terms, the full-vocabulary JSD or reverse KL against
the teacher's log-prob shard for `jsd` and the KL trust region.
"""

from typing import Optional

import torch

from megatron_tropd.distill.losses import Needs, TokenInputs
from megatron_tropd.ops import vocab_parallel as vp


def token_inputs(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    vocab_size: int,
    needs: Needs,
    *,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    on_policy: torch.Tensor,
    prefix: torch.Tensor,
    uniform: Optional[torch.Tensor] = None,
    selected: Optional[torch.Tensor] = None,
    teacher_topk_logprobs: Optional[torch.Tensor] = None,
    teacher_topk_ids: Optional[torch.Tensor] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
    teacher_full_logprobs: Optional[torch.Tensor] = None,
    jsd_beta: float = 0.5,
    group=None,
) -> TokenInputs:
    """Per-token loss inputs for rows of logits aligned with their target tokens.

    Args:
        student_logits: `[T, V/tp]` shard, row t scoring `tokens[t]` (with grad).
        tokens: `[T]` global token ids; the per-token tensors are `[T]`, top-k ones `[T, k]`.
        teacher_full_logprobs: `[T, V/tp]` teacher log-prob shard, needed for jsd / KL region.
    """
    x = TokenInputs(
        student_logprobs=vp.token_log_probs(student_logits, tokens, vocab_size, group),
        old_logprobs=old_logprobs,
        teacher_logprobs=teacher_logprobs,
        on_policy=on_policy,
        prefix=prefix,
        uniform=uniform,
        selected=selected,
        teacher_entropy=teacher_entropy,
    )
    if needs.topk:
        x.teacher_topk_logprobs = teacher_topk_logprobs
        x.student_topk_logprobs = vp.log_probs_at(student_logits, teacher_topk_ids, vocab_size, group)
    if needs.jsd:
        x.jsd = vp.jsd(student_logits, teacher_full_logprobs, jsd_beta, vocab_size, group)
    if needs.reverse_kl:
        with torch.no_grad():
            x.reverse_kl = vp.kl_divergence(student_logits, teacher_full_logprobs, vocab_size, group)
    return x
