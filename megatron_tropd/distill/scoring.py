"""Forward-only passes that turn a model's logits at the scored tokens into per-token values of
the batch's token record: the frozen teacher's signals (`distill.teacher`), and the student's own
log-probs when `lp_S_old` is recomputed before the update.

Each runs through megatron's `get_forward_backward_func()` with `forward_only=True` over the
micro-batches the update uses, so under pipeline parallelism micro-batches flow through the
stages as in training; the values exist on the last pipeline stage only.
"""

import torch

from megatron_tropd.models.forward import scored_logits
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.tokens import MicroBatch, TokenBatch


@cuda_to_cpu()
def forward_only(model, micro_batches, values):
    """`values(mb, logits [N_mb, V/tp])` -> {record field: tensor} of every micro-batch, on the
    last pipeline stage (None elsewhere); collective over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, stage):
        mb = next(data_iterator)
        return scored_logits(stage, mb.tokens, mb.scored), \
            lambda logits, non_loss_data=True: values(mb, logits)

    with torch.no_grad():
        parts = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=True, collect_non_loss_data=True)
    return parts if parallel_state.is_pipeline_last_stage() else None


def write(batch: TokenBatch, micro_batches, parts, where=None):
    """The micro-batches' values into the record's fields at their entries (allocated as zeros
    on first use); `where`: `[N]` bool, only these entries (the others keep their values)."""
    record = batch.record
    for mb, values in zip(micro_batches, parts):
        for name, value in values.items():
            field = getattr(record, name)
            if field is None:
                field = value.new_zeros((len(record),) + value.shape[1:])
                setattr(record, name, field)
            if where is None:
                field[mb.index] = value
            else:
                keep = where[mb.index]
                field[mb.index[keep]] = value[keep]


def recompute_old_logprobs(student, batch: TokenBatch, micro_batches, vocab_size: int):
    """`lp_S_old` of the student's tokens from a forward-only pass of the training model, so the
    update's first ratio exp(lp_S - lp_S_old) is exactly 1 (the sampler's decode path rounds
    differently in bf16 and with TransformerEngine). Prefix tokens keep 0."""
    def log_probs(mb: MicroBatch, logits):
        return {"old_logprobs": vp.token_log_probs(logits, mb.tokens[mb.scored], vocab_size)}

    parts = forward_only(student, micro_batches, log_probs)
    if parts is not None:
        write(batch, micro_batches, parts, where=batch.record.on_policy)
