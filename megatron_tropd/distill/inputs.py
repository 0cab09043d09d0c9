"""Student-side per-token quantities of one micro-batch, computed vocabulary-parallel from the
student's sharded logits, added to the micro-batch's token record for the loss to read.

Only what `losses.needs(config)` asks for is computed: the token log-prob always, the student's
log-probs at the teacher's top-k ids for FKL terms, the full-vocabulary JSD or reverse KL against
the teacher's logits shard of the same micro-batch for `jsd` and the KL trust region.
"""

import dataclasses
from typing import Optional

import torch

from megatron_tropd.distill.losses import Needs
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.tokens import TokenRecord


def with_student_inputs(
    record: TokenRecord,
    student_logits: torch.Tensor,
    vocab_size: int,
    needs: Needs,
    teacher_logits: Optional[torch.Tensor] = None,
    jsd_beta: float = 0.5,
    group=None,
) -> TokenRecord:
    """`record` (a micro-batch's entries) with the student's fields filled in.

    Args:
        student_logits: `[N, V/tp]` shard, row n scoring `record.ids[n]` (with grad).
        teacher_logits: `[N, V/tp]` the teacher's shard at the same tokens (no grad), for jsd and
            the KL trust region.
    """
    fields = dict(student_logprobs=vp.token_log_probs(student_logits, record.ids, vocab_size,
                                                      group))
    if needs.topk:
        fields["student_topk_logprobs"] = vp.log_probs_at(
            student_logits, record.teacher_topk_ids.long(), vocab_size, group)
    if needs.jsd:
        fields["jsd"] = vp.jsd(student_logits, teacher_logits, jsd_beta, vocab_size, group)
    if needs.reverse_kl:
        with torch.no_grad():
            fields["reverse_kl"] = vp.kl_divergence(student_logits, teacher_logits, vocab_size,
                                                    group)
    return dataclasses.replace(record, **fields)
