"""The teacher's scoring pass: a forward-only pass of the frozen teacher over prompt + response that
turns its vocabulary-sharded logits into the per-token signals the losses need, written into the
batch's token record.

It runs through megatron's `get_forward_backward_func()` with `forward_only=True` over the
micro-batches the student update uses (`tokens.plan_micro_batches`), so under pipeline
parallelism micro-batches flow through the stages as in training; the signals exist on the last
pipeline stage only (where the student's logits are too). Per response token it keeps the log-prob
of the token, the teacher's top-k ids and log-probs and its entropy: O(k) memory per token. The
losses that need the teacher's full distribution (JSD, the KL trust region) get it per
micro-batch inside the student update instead (`models.forward.scored_logits(teacher=...)`).
"""

import torch

from megatron_tropd.models.forward import scored_logits
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.tokens import MicroBatch, TokenBatch


def score(teacher, batch: TokenBatch, micro_batches, vocab_size: int, top_k: int):
    """Score `batch` with the frozen `teacher` (collective over the model-parallel group): on the
    last pipeline stage `batch.record` gets `teacher_logprobs`, `teacher_entropy` and, when
    `top_k` > 0, `teacher_topk_logprobs` and `teacher_topk_ids` (int32).

    Args:
        teacher: this rank's stage of the teacher GPTModel (same TP/PP groups as the student).
        micro_batches: `MicroBatch`es covering the batch's rows (`TokenBatch.micro_batch`).
        vocab_size: the true vocabulary shared by student and teacher.
        top_k: how many of the teacher's most likely tokens to keep per token (0: none, for
            losses without top-k terms; it saves a top-k over the vocabulary shard and its
            all-gather).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        predicting = scored_logits(model, mb.tokens, mb.scored)  # [N_mb, V/tp], last stage
        return predicting, lambda logits, non_loss_data=True: _signals(mb, logits, vocab_size,
                                                                        top_k)

    with torch.no_grad():
        parts = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=teacher,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return
    record = batch.record
    n, device = len(record), record.ids.device
    record.teacher_logprobs = torch.zeros(n, device=device)
    record.teacher_entropy = torch.zeros(n, device=device)
    if top_k:
        record.teacher_topk_logprobs = torch.zeros((n, top_k), device=device)
        record.teacher_topk_ids = torch.zeros((n, top_k), dtype=torch.int32, device=device)
    for mb, signals in zip(micro_batches, parts):
        for name, values in signals.items():
            getattr(record, name)[mb.index] = values


def _signals(mb: MicroBatch, predicting, vocab_size, top_k):
    """Signals of one micro-batch from the logits shard `predicting [N_mb, V/tp]` of its scored
    tokens (the schedule's non-loss-data hook), in the order of `mb.index`."""
    targets = mb.tokens[mb.scored]  # the same order: a scored token is never at column 0
    signals = dict(teacher_logprobs=vp.token_log_probs(predicting, targets, vocab_size).float(),
                   teacher_entropy=vp.entropy(predicting, vocab_size).float())
    if top_k:
        topk_lp, topk_ids = vp.topk_log_probs(predicting, top_k, vocab_size)
        signals.update(teacher_topk_logprobs=topk_lp, teacher_topk_ids=topk_ids.int())
    return signals
