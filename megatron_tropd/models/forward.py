"""The forward of a GPTModel stage for a per-token loss: logits only where tokens are scored.

megatron-core's `GPTModel.forward` projects every position of `[B, T]` onto the vocabulary shard
and returns the logits transposed to `[B, T, V/tp]` (a copy); a loss over some tokens then selects
their rows (another copy, whose backward writes a zero gradient of the full `[B, T, V/tp]` shape
twice). On a distillation batch the prompt's positions are a third of the sequence and the logits
are most of the memory traffic, so the trainer and the teacher run the model's pieces themselves,
as `GPTModel.forward` composes them (embedding, decoder with RoPE and plain causal attention,
final norm, output layer) and project only the positions that predict a scored token:

    scored [B, T] (bool)  ->  hidden at column j - 1 of every scored token at column j
                          ->  output_layer -> logits [N, V/tp], row n scores the n-th True entry
                              of `scored` in row-major order

Rows start at column 0 and are right-padded (`megatron_tropd.tokens`), so no attention mask is
given: megatron's causal mask type is exact, and TransformerEngine's fused attention runs.

The output layer is megatron's own `ColumnParallelLinear` (its tensor-parallel backward and its
DDP gradient hooks are untouched). Pipeline stages other than the last return their hidden states
`[T, B, H]` for the schedule to send on, as `GPTModel.forward` does.

With a `teacher` the frozen teacher's logits at the same positions come along, without gradient
(the losses that need the teacher's full distribution compute it per micro-batch, never for the
whole batch). Under pipeline parallelism the teacher's hidden states travel with the student's,
concatenated along the hidden dimension `[T, B, H_student + H_teacher]` (the schedule sends the
shape first: `variable_seq_lengths`), and are split again on the next stage; the teacher's part
gets no gradient.
"""

import torch


def scored_logits(model, tokens, scored, teacher=None):
    """This rank's stage on `tokens [B, T]`: on the last pipeline stage the vocabulary-sharded
    logits predicting the tokens `scored [B, T]` marks, `[N, V/tp]` (N = scored.sum(), row-major
    order of `scored`, the order of `tokens[scored]`); elsewhere the stage's hidden states.

    Args:
        model: this rank's GPTModel stage, bare or wrapped (megatron's DDP, `.module`).
        scored: the tokens a loss is computed on; column 0 has no prediction and must be False.
        teacher: a frozen GPTModel stage on the same layout: on the last stage the result is
            `(student logits, teacher logits)`, both `[N, V/tp]`; elsewhere both stages' hidden
            states, concatenated.
    """
    gpt = _unwrap(model)
    if teacher is None:
        return _project(gpt, _decoder(gpt, tokens), scored)
    hidden_size = gpt.config.hidden_size
    if not gpt.pre_process:  # the schedule gave the student both stages' hidden states
        received = gpt.decoder.input_tensor
        gpt.decoder.set_input_tensor(received[..., :hidden_size])
        teacher.decoder.set_input_tensor(received[..., hidden_size:])
    hidden = _decoder(gpt, tokens)
    with torch.no_grad():
        teacher_hidden = _decoder(teacher, tokens)
        if gpt.post_process:
            teacher_logits = _project(teacher, teacher_hidden, scored)
    if not gpt.post_process:
        return torch.cat([hidden, teacher_hidden], dim=-1)
    return _project(gpt, hidden, scored), teacher_logits


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _decoder(gpt, tokens):
    """Embedding (first stage) and decoder layers; later stages read the schedule's input from
    `decoder.set_input_tensor`."""
    hidden = gpt.embedding(input_ids=tokens, position_ids=None) if gpt.pre_process else None
    return gpt.decoder(hidden_states=hidden, attention_mask=None,
                       rotary_pos_emb=gpt.rotary_pos_emb(tokens.shape[1]))


def _project(gpt, hidden, scored):
    """The last stage's output layer at the positions predicting `scored` tokens; other stages'
    hidden states unchanged."""
    if not gpt.post_process:
        return hidden
    predicting = hidden.transpose(0, 1)[:, :-1][scored[:, 1:]]  # [N, H]
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else None
    logits, _ = gpt.output_layer(predicting.unsqueeze(1), weight=weight)  # [N, 1, V/tp]
    return logits.squeeze(1)
