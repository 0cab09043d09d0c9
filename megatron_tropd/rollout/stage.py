"""Generation forwards of this rank's pipeline stage, ending in vocabulary-sharded logits.

megatron-core 0.16.1's `GPTModel.forward` all-gathers the vocabulary whenever it is given an
inference context ("Inference must always gather TP logits"), which a vocabulary-parallel sampler
does not need. So generation runs the model's pieces itself: embedding (first stage), decoder
(the cached forwards of `rollout.kv_cache`, or megatron's own for the full-recompute reference),
final norm (on the last stage) and the output layer's product with the local weight shard, at the
positions that predict the next token only.

Under pipeline parallelism the stages run one after another for each forward: a stage receives
the hidden states `[s, B, H]` from the previous stage (point-to-point; every stage knows the
shape, as every stage makes the same scheduling decisions), runs its layers and sends them on. The
ids the last stage samples are broadcast back over the pipeline group, so every stage knows the
next input and which rows have ended.
"""

import torch
import torch.distributed as dist

from megatron_tropd.rollout.kv_cache import DecodeLinear


class GenerationStage:
    """This rank's stage of a GPTModel, run one generation forward at a time.

    Args:
        model: this rank's GPTModel stage (as `models.builder.build_model` returns it).
        max_length: the longest sequence (context + new tokens) it will be run on.
        rows: the rows of a decode step (the slots), for which the output layer is prepared.
    """

    def __init__(self, model, max_length: int, rows: int):
        from megatron.core import parallel_state as ps

        self.model = model
        self.is_first = ps.is_pipeline_first_stage()
        self.is_last = ps.is_pipeline_last_stage()
        self.pipelined = ps.get_pipeline_model_parallel_world_size() > 1
        if self.pipelined:
            self.pp_group = ps.get_pipeline_model_parallel_group()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
        config = model.config
        self.hidden_size = config.hidden_size
        self.dtype = config.params_dtype
        self.device = next(model.parameters()).device
        # RoPE angles of positions 0..max_length-1, computed once: the KV cache takes each row's
        # angles from this table, a full recompute its first rows.
        self.rope = model.rotary_pos_emb(max_length)
        if self.is_last:
            weight = (model.shared_embedding_or_output_weight()
                      if model.share_embeddings_and_output_weights else model.output_layer.weight)
            self.output_layer = DecodeLinear(weight, rows)  # [B, H] -> [B, V/tp]

    def decode(self, kv_cache, tokens, positions, keys_used: int):
        """One token per slot, `tokens [slots]` at `positions [slots]`: the logits shard
        predicting each slot's next token `[slots, V/tp]` on the last stage, None elsewhere."""
        hidden = kv_cache.decode(self._input(tokens[:, None]), positions, keys_used)
        return self._output(hidden, lambda h: h[0])

    def prefill(self, kv_cache, tokens, contexts_of_slots, slots):
        """Cache contexts `tokens [U, L]` (right-padded) into cache rows (`KVCache.prefill`)."""
        hidden = kv_cache.prefill(self._input(tokens), contexts_of_slots, slots)
        if not self.is_last:  # the last stage needs no logits: a context's last token is decoded
            dist.send(hidden.contiguous(), dst=self.next_rank)

    def full_forward(self, tokens, positions):
        """megatron's own forward of `tokens [B, T]` (right-padded; causal attention, no mask):
        the logits shard at `positions [B]` (each row's last token) on the last stage."""
        hidden = self._input(tokens)
        if not self.is_first:  # megatron's decoder reads a later stage's input from here
            self.model.decoder.set_input_tensor(hidden)
        hidden = self.model.decoder(hidden_states=hidden, attention_mask=None,
                                    rotary_pos_emb=self.rope[:tokens.shape[1]])
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self._output(hidden, lambda h: h[positions, rows])

    def broadcast_from_last(self, tensor):
        """The last stage's `tensor` on every stage (other stages pass a buffer of its shape)."""
        if self.pipelined:
            dist.broadcast(tensor, src=self.last_rank, group=self.pp_group)
        return tensor

    def _input(self, tokens):
        """This stage's input for `tokens [B, s]`: the embedding on the first stage, else the
        previous stage's hidden states `[s, B, H]`."""
        if self.is_first:
            # position_ids feed only learned absolute position embeddings; ours are RoPE.
            return self.model.embedding(input_ids=tokens, position_ids=None)
        hidden = torch.empty((tokens.shape[1], tokens.shape[0], self.hidden_size),
                             dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=self.prev_rank)
        return hidden

    def _output(self, hidden, predicting):
        """Last stage: megatron's output layer on the rows `predicting(hidden) [B, H]` without
        gathering the vocabulary (in the forward pass its column-parallel linear is this product
        with the local weight shard). Other stages send `hidden [s, B, H]` on and return None."""
        if not self.is_last:
            dist.send(hidden.contiguous(), dst=self.next_rank)
            return None
        return self.output_layer(predicting(hidden))
