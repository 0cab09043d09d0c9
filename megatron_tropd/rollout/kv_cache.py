"""The KV cache of generation, and the forward of this stage's layers that uses it.

megatron-core 0.16.1's static KV cache (`StaticInferenceContext`) stores keys before RoPE and, at
every decode step and in every layer, rotates the whole cache again and repeats its key/value
heads for grouped-query attention: work that grows with the sequence, on every token. On top of
that, megatron's layer and attention forwards carry Python for training features (recomputation,
offloading, CUDA graphs) that a decode step pays per layer. Here keys are stored after RoPE, once;
attention runs through `scaled_dot_product_attention` with grouped heads (`enable_gqa`); and each
layer is its megatron submodules (norms, QKV and output projections with their tensor-parallel
communication, MLP) composed as megatron's layer composes them in eval mode:

    h = h + self_attention(input_layernorm(h));   h = h + mlp(pre_mlp_layernorm(h))

Training never goes through this module; the tests check generation with it against megatron's
own forward. `check_supported` rejects configurations this composition does not cover.
"""

import math

import torch
import torch.nn.functional as F


class UnsupportedModelError(ValueError):
    """A model feature the cached forward does not implement: one-line message."""


def check_supported(model):
    """Raise `UnsupportedModelError` for features the cached forward lacks."""
    config = model.config
    unsupported = {
        "sequence parallelism": config.sequence_parallel,
        "multi-latent attention": config.multi_latent_attention,
        "mixture-of-experts layers": config.num_moe_experts is not None,
        "an attention output gate": getattr(config, "attention_output_gate", False),
        "sliding-window attention": config.window_size is not None,
        "a non-standard softmax": getattr(config, "softmax_type", "vanilla") != "vanilla",
        "residual connections after the layer norm": config.apply_residual_connection_post_layernorm,
        "fp32 residual connections": config.fp32_residual_connection,
        f"{model.position_embedding_type} position embeddings":
            model.position_embedding_type != "rope",
    }
    for feature, present in unsupported.items():
        if present:
            raise UnsupportedModelError(f"generation does not support models with {feature}")


class KVCache:
    """Keys (after RoPE) and values of every layer of this rank's pipeline stage.

    Args:
        model: this rank's GPTModel stage.
        batch_size, max_length: rows and columns the cache holds.
        rope: RoPE angles of positions `0..max_length-1`, `[max_length, 1, 1, rotary dim]`.

    Each layer holds keys and values `[batch, key/value heads per TP rank, max_length, head dim]`.
    `position` is the column of the first token of the next forward.
    """

    def __init__(self, model, batch_size: int, max_length: int, rope):
        check_supported(model)
        config = model.config
        device = next(model.parameters()).device
        self.layers = []
        for layer in model.decoder.layers:
            shape = (batch_size, layer.self_attention.num_query_groups_per_partition, max_length,
                     config.kv_channels)
            self.layers.append(tuple(torch.empty(shape, dtype=config.params_dtype, device=device)
                                     for _ in range(2)))
        self.rope = rope
        self.scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.position = 0

    def decoder_forward(self, decoder, hidden, attention_mask):
        """This stage's layers (and the final norm on the last stage) on `hidden [s, B, H]` at
        columns `[position, position + s)`, caching their keys and values; `attention_mask`
        `[B, 1, s, position + s]` bool, True = masked. Advances `position` by s."""
        start = self.position
        end = start + hidden.shape[0]
        allowed = ~attention_mask  # SDPA's boolean masks mark what may be attended to
        for layer, (keys, values) in zip(decoder.layers, self.layers):
            attention, bias = self._attention(layer.self_attention, keys, values,
                                              layer.input_layernorm(hidden), allowed, start, end)
            hidden = _residual(hidden, attention, bias)
            mlp, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = _residual(hidden, mlp, bias)
        if decoder.final_layernorm is not None:
            hidden = decoder.final_layernorm(hidden)
        self.position = end
        return hidden

    def _attention(self, attention, keys, values, hidden, allowed, start, end):
        """megatron's projections and RoPE around a cached SDPA: `(output [s, B, H], bias)`."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        query, key, value = attention.get_query_key_value_tensors(hidden)  # [s, B, heads, d]
        angles = self.rope[start:end]
        query = apply_rotary_pos_emb(query, angles, config=attention.config)
        key = apply_rotary_pos_emb(key, angles, config=attention.config)
        keys[:, :, start:end] = key.permute(1, 2, 0, 3)
        values[:, :, start:end] = value.permute(1, 2, 0, 3)
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), keys[:, :, :end], values[:, :, :end],
            attn_mask=allowed, scale=self.scale, enable_gqa=True,
        )  # [B, heads, s, d]
        context = context.permute(2, 0, 1, 3).reshape(end - start, context.shape[0], -1)
        return attention.linear_proj(context)


def _residual(residual, output, bias):
    """megatron's bias-dropout-add in eval mode."""
    return residual + (output if bias is None else output + bias)
