"""The teacher's scoring pass: a forward-only pass of the frozen teacher over prompt + response that
turns its vocabulary-sharded logits into the per-token signals the losses need, written into the
batch's token record.

It is a forward-only pass over the micro-batches the student update uses (`distill.scoring`), so
the signals exist on the last pipeline stage only (where the student's logits are too). Per
response token it keeps the log-prob of the token, the teacher's top-k ids and log-probs and its
entropy: O(k) memory per token. The losses that need the teacher's full distribution (JSD, the
KL trust region) get it per micro-batch inside the student update instead
(`models.forward.scored_logits(teacher=...)`).
"""

from megatron_tropd.distill.scoring import forward_only, write
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
    parts = forward_only(teacher, micro_batches,
                         lambda mb, logits: _signals(mb, logits, vocab_size, top_k))
    if parts is not None:
        write(batch, micro_batches, parts)


def _signals(mb: MicroBatch, predicting, vocab_size, top_k):
    """Signals of one micro-batch from the logits shard `predicting [N_mb, V/tp]` of its scored
    tokens (the schedule's non-loss-data hook), in the order of `mb.index`."""
    targets = mb.tokens[mb.scored]  # the same order: a scored token is never at column 0
    signals = dict(teacher_logprobs=vp.token_log_probs(predicting, targets, vocab_size),
                   teacher_entropy=vp.entropy(predicting, vocab_size))
    if top_k:
        topk_lp, topk_ids = vp.topk_log_probs(predicting, top_k, vocab_size)
        signals.update(teacher_topk_logprobs=topk_lp, teacher_topk_ids=topk_ids.int())
    return signals
