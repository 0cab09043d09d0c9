"""The forward of a GPTModel stage for a per-token loss: logits only where tokens are scored.

megatron-core's `GPTModel.forward` projects every position of `[B, T]` onto the vocabulary shard
and returns the logits transposed to `[B, T, V/tp]` (a copy); a loss over some tokens then selects
their rows (another copy, whose backward writes a zero gradient of the full `[B, T, V/tp]` shape
twice). On a distillation batch the prompt's positions are a third of the sequence and the logits
are most of the memory traffic, so the trainer and the teacher run the model's pieces themselves,
as `GPTModel.forward` composes them (embedding, decoder with RoPE, final norm, output layer) and
project only the positions that predict a scored token:

    scored [B, T] (bool)  ->  hidden at column j - 1 of every scored token at column j
                          ->  output_layer -> logits [N, V/tp], row n scores the n-th True entry
                              of `scored` in row-major order

The output layer is megatron's own `ColumnParallelLinear` (its tensor-parallel backward and its
DDP gradient hooks are untouched). Pipeline stages other than the last return their hidden states
`[T, B, H]` for the schedule to send on, as `GPTModel.forward` does.
"""


def scored_logits(model, tokens, attention_mask, scored):
    """This rank's stage on `tokens [B, T]`: on the last pipeline stage the vocabulary-sharded
    logits predicting the tokens `scored [B, T]` marks, `[N, V/tp]` (N = scored.sum(), row-major
    order of `scored`, the order of `tokens[scored]`); elsewhere the stage's hidden states.

    Args:
        model: this rank's GPTModel stage, bare or wrapped (megatron's DDP, `.module`).
        attention_mask: `[B, 1, T, T]` bool, True = masked; None for plain causal attention.
        scored: the tokens a loss is computed on; column 0 has no prediction and must be False
            (`tokens[scored]` then lines up with the rows; a scored column 0 would leave one target
            more than rows, which the loss's shapes reject).
    """
    gpt = model.module if hasattr(model, "module") else model
    # Non-first stages: megatron's decoder takes its input from `set_input_tensor` (the schedule's).
    hidden = gpt.embedding(input_ids=tokens, position_ids=None) if gpt.pre_process else None
    hidden = gpt.decoder(hidden_states=hidden, attention_mask=attention_mask,
                         rotary_pos_emb=gpt.rotary_pos_emb(tokens.shape[1]))
    if not gpt.post_process:
        return hidden
    predicting = hidden.transpose(0, 1)[:, :-1][scored[:, 1:]]  # [N, H]
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else None
    logits, _ = gpt.output_layer(predicting.unsqueeze(1), weight=weight)  # [N, 1, V/tp]
    return logits.squeeze(1)
