"""The teacher's scoring pass: a forward-only pass of the frozen teacher over prompt + response that
turns its vocabulary-sharded logits into the per-token signals the losses need.

It runs through megatron's `get_forward_backward_func()` with `forward_only=True`, so under
pipeline parallelism micro-batches flow through the stages as in training; the signals exist on the
last pipeline stage only (where the student's logits are too). Per response token it keeps the
log-prob of the sampled token, the teacher's top-k ids and log-probs and its entropy: O(k) memory
per token. The full log-prob shard over the local vocabulary (`[B, T, V/tp]`) is kept only when a
loss asks for it (full-vocabulary JSD, KL-threshold trust region).
"""

import dataclasses
import functools
from typing import Optional

import torch

from megatron_tropd.models.forward import scored_logits
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.rollout.batch import RolloutBatch, causal_padding_mask

DEFAULT_TOP_K = 64


@dataclasses.dataclass
class TeacherSignals:
    """The teacher's view of every response token, aligned with `RolloutBatch.tokens`: entry
    `[b, j]` is about token j given the tokens before it. Entries outside `mask` are zero.

    Args:
        mask: `[B, T]` bool, the scored tokens (the batch's `response_mask`).
        token_log_probs: `[B, T]` float32, `lp_T` of the token in the sequence.
        topk_log_probs: `[B, T, k]` float32, the teacher's k largest log-probs (normalised over
            the full vocabulary), descending; None when scored with `top_k=0`.
        topk_ids: `[B, T, k]` int64, their global token ids; None with `top_k=0`.
        entropy: `[B, T]` float32, entropy of the teacher's full-vocabulary distribution.
        log_probs: `[B, T, V/tp]` the teacher's log-probs over this rank's vocabulary shard
            (padded columns -inf), only when asked for; None otherwise.
    """

    mask: torch.Tensor
    token_log_probs: torch.Tensor
    topk_log_probs: Optional[torch.Tensor]
    topk_ids: Optional[torch.Tensor]
    entropy: torch.Tensor
    log_probs: Optional[torch.Tensor] = None

    @classmethod
    def cat(cls, parts):
        """Join micro-batches along the batch dimension."""
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{
            name: None if getattr(parts[0], name) is None
            else torch.cat([getattr(p, name) for p in parts]) for name in fields
        })


def score(teacher, batch: RolloutBatch, vocab_size: int, top_k: int = DEFAULT_TOP_K,
          full_log_probs: bool = False, micro_batch_size: Optional[int] = None):
    """Score `batch` with the frozen `teacher` (collective over the model-parallel group).

    Args:
        teacher: this rank's stage of the teacher GPTModel (same TP/PP groups as the student).
        vocab_size: the true vocabulary shared by student and teacher.
        top_k: how many of the teacher's most likely tokens to keep per position (0: none, for
            losses without top-k terms; it saves a top-k over the vocabulary shard and its
            all-gather).
        full_log_probs: also keep the log-prob shard over the local vocabulary.
        micro_batch_size: rows per forward (default: the whole batch); must divide the batch.
    Returns: `TeacherSignals` on the last pipeline stage, None on the others.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, length = batch.tokens.shape
    micro_batch_size = micro_batch_size or rows
    if rows % micro_batch_size != 0:
        raise ValueError(f"micro batch size {micro_batch_size} does not divide the {rows} rows")
    mask, padding = batch.response_mask, batch.padding
    micro_batches = [
        (batch.tokens[s:s + micro_batch_size], padding[s:s + micro_batch_size],
         mask[s:s + micro_batch_size])
        for s in range(0, rows, micro_batch_size)
    ]

    def forward_step(data_iterator, model):
        tokens, padding, scored = next(data_iterator)
        attention_mask = causal_padding_mask(padding, 0, length)  # [b, 1, T, T], per micro-batch
        predicting = scored_logits(model, tokens, attention_mask, scored)  # [N, V/tp], last stage
        return predicting, functools.partial(_signals, tokens, scored, vocab_size, top_k,
                                             full_log_probs)

    with torch.no_grad():
        parts = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=teacher,
            num_microbatches=len(micro_batches),
            seq_length=length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return TeacherSignals.cat(parts)


def _signals(tokens, mask, vocab_size, top_k, full_log_probs, predicting, non_loss_data=True):
    """Signals of one micro-batch from the logits shard `predicting [N, V/tp]` of its N scored
    tokens (the schedule's non-loss-data hook), row-major: the logits at column j - 1 score the
    token at column j."""
    targets = tokens[mask]  # the same order: a response token is never at column 0
    b, t = tokens.shape

    def aligned(values, *shape):
        out = values.new_zeros((b, t) + shape)
        out[mask] = values
        return out

    topk_lp, topk_ids = vp.topk_log_probs(predicting, top_k, vocab_size) if top_k else (None, None)
    return TeacherSignals(
        mask=mask,
        token_log_probs=aligned(vp.token_log_probs(predicting, targets, vocab_size).float()),
        topk_log_probs=aligned(topk_lp, top_k) if top_k else None,
        topk_ids=aligned(topk_ids, top_k) if top_k else None,
        entropy=aligned(vp.entropy(predicting, vocab_size).float()),
        log_probs=aligned(vp.log_softmax(predicting, vocab_size), predicting.shape[-1])
        if full_log_probs else None,
    )
