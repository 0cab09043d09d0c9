"""Core attention of the local (non-TransformerEngine) layer spec through torch's fused kernels.

megatron-core's `DotProductAttention` materialises the attention scores `[b, heads/tp, s, s]` in a
global buffer, a `baddbmm` result, the masked scores and the softmax probabilities (saved for
backward): four tensors of T² per head at once, 4 GB for one 4k-token row of the Qwen3-8B teacher
at TP=2, growing with the square of the sequence. Our rows start at column 0 and are right-padded
(`megatron_tropd.tokens`), so plain causal attention is exact and
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)` can run it with its flash
kernels (CPU and CUDA, forward and backward) in memory linear in T, as TransformerEngine's fused
attention does on a GPU. Grouped key/value heads go in as they are (`enable_gqa`), not repeated.

The class keeps `DotProductAttention`'s constructor, attributes and checkpoint layout (it has no
parameters of its own); features it does not cover (sliding windows, softmax offsets, fp16
query-key layer scaling) fall back to megatron's own computation.
"""

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class FusedCausalAttention(DotProductAttention):
    """`DotProductAttention` computed by `scaled_dot_product_attention`: query `[sq, b, heads/tp,
    d]`, key and value `[sk, b, key/value heads/tp, d]` -> context `[sq, b, heads/tp * d]`.
    `attention_mask` None means causal (the layer spec's mask type); a boolean mask (True =
    masked, megatron's convention) is applied as given."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        config = self.config
        if (config.window_size is not None or getattr(config, "softmax_type", "vanilla") != "vanilla"
                or config.apply_query_key_layer_scaling):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        assert packed_seq_params is None and attention_bias is None, \
            "packed sequences and attention biases need TransformerEngine's attention"
        causal = attention_mask is None and (attn_mask_type or self.attn_mask_type) == \
            AttnMaskType.causal
        allowed = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        # dropout draws from megatron's model-parallel RNG stream, as DotProductAttention's
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=True)
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1],
                                                   self.hidden_size_per_partition)
