"""One generation forward of this rank's pipeline stage, ending in vocabulary-sharded logits.

megatron-core 0.16.1's `GPTModel.forward` all-gathers the vocabulary whenever it is given an
inference context ("Inference must always gather TP logits"), which a vocabulary-parallel sampler
does not need. So generation runs the model's pieces itself: embedding (first stage), decoder
(megatron's, or the cached forward of `rollout.kv_cache`), final norm (on the last stage) and the
output layer's product with the local weight shard, on the last position only.

Under pipeline parallelism the stages run one after another for each step: a stage receives the
hidden states `[s, B, H]` from the previous stage (point-to-point; both sides know the shape),
runs its layers and sends them on. The ids the last stage samples are broadcast back over the
pipeline group, so every stage knows the next input and when generation ends.
"""

import torch
import torch.distributed as dist

from megatron_tropd.rollout.kv_cache import DecodeLinear


class GenerationStage:
    """This rank's stage of a GPTModel, run one generation step at a time.

    Args:
        model: this rank's GPTModel stage (as `models.builder.build_model` returns it).
        max_length: the longest sequence (context + new tokens) it will be run on.
        rows: the rows of every step (the batch).
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
        self.hidden_shape = (config.hidden_size,)
        self.dtype = config.params_dtype
        self.device = next(model.parameters()).device
        # RoPE angles of positions 0..max_length-1, computed once: the KV cache takes the rows of
        # the current step from this table, a full recompute its first rows.
        self.rope = model.rotary_pos_emb(max_length)
        if self.is_last:
            weight = (model.shared_embedding_or_output_weight()
                      if model.share_embeddings_and_output_weights else model.output_layer.weight)
            self.output_layer = DecodeLinear(weight, rows)  # [B, H] -> [B, V/tp]

    def forward(self, tokens, attention_mask, kv_cache=None):
        """Run this stage on `tokens [B, s]` (columns from `kv_cache.position` on with a KV cache,
        from column 0 without one).

        Args:
            attention_mask: `[B, 1, s, keys]` bool, True = masked (see `batch.causal_padding_mask`).
            kv_cache: the `KVCache` of this generation, or None for megatron's own forward of the
                whole sequence so far (what training computes).
        Returns: logits shard of the last position `[B, V/tp]` on the last stage, None elsewhere.
        """
        batch, length = tokens.shape
        if self.is_first:
            # position_ids feed only learned absolute position embeddings; ours are RoPE.
            hidden = self.model.embedding(input_ids=tokens, position_ids=None)
        else:
            hidden = torch.empty((length, batch) + self.hidden_shape, dtype=self.dtype,
                                 device=self.device)
            dist.recv(hidden, src=self.prev_rank)
        if kv_cache is None:
            if not self.is_first:  # megatron's decoder reads a later stage's input from here
                self.model.decoder.set_input_tensor(hidden)
            hidden = self.model.decoder(hidden_states=hidden, attention_mask=attention_mask,
                                        rotary_pos_emb=self.rope[:length])
        else:
            hidden = kv_cache.decoder_forward(hidden, attention_mask)
        if not self.is_last:
            dist.send(hidden.contiguous(), dst=self.next_rank)
            return None
        # megatron's output layer on the last position, without gathering the vocabulary: in the
        # forward pass its column-parallel linear is this product with the local weight shard.
        return self.output_layer(hidden[-1])

    def broadcast_from_last(self, tensor):
        """The last stage's `tensor` on every stage (other stages pass a buffer of its shape)."""
        if self.pipelined:
            dist.broadcast(tensor, src=self.last_rank, group=self.pp_group)
        return tensor
