"""The KV cache of generation, and the forwards of this stage's layers that use it.

megatron-core 0.16.1's static KV cache (`StaticInferenceContext`) stores keys before RoPE and, at
every decode step and in every layer, rotates the whole cache again and repeats its key/value
heads for grouped-query attention: work that grows with the sequence, on every token; it also
keeps one position for the whole batch, so rows cannot start, stop or be replaced on their own.
Its layer, attention and linear modules carry Python for training features (recomputation,
offloading, autograd functions for tensor-parallel communication) that a decode step pays per
layer, and on a CPU the products of a few rows with megatron's `[out, in]` weights run well below
the memory bandwidth they are bound by (see `DecodeLinear`).

So the layers are written here as plain tensor operations on the layer's own weights, taken from
its megatron modules when the cache is made (`_DecodeLayer`), in the order megatron's layer
computes in eval mode:

    h = h + proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))    q, k, v = split(qkv(norm1(h)))
    h = h + fc2(silu(gate) * up)                                    gate | up = fc1(norm2(h))

The cache is organised in *slots* (continuous batching, `rollout.engine`): each slot holds one row
at its own position, so RoPE angles and the attended key range are per row. `prefill` caches
contexts (causal attention over the context alone) into any slots, several slots taking the same
context from one computation; `decode` runs one token per slot. Keys are stored after RoPE, once;
attention runs through `scaled_dot_product_attention` with grouped heads (`enable_gqa`), which on
a CPU is the flash kernel in both cases (no `[T, T]` scores). Tensor parallelism is megatron's:
QKV and fc1 are column-parallel (the local heads / the local slice of the hidden MLP, no
communication), the output projection and fc2 row-parallel (their partial products all-reduced
over the tensor-parallel group). The products run through `DecodeLinear` (`runtime.cpu_speedups`:
on a CPU with MKL, from weights packed for the decode step's row count when the cache is made).

Training never goes through this module; the tests check generation with it against megatron's
own forward. `check_supported` rejects configurations this composition does not cover.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tropd.errors import UserError
from megatron_tropd.runtime.cpu_speedups import DecodeLinear


def check_supported(model):
    """A `UserError` for features the cached forward lacks."""
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
        "partial or interleaved rotary embeddings":
            config.rotary_interleaved or model.rotary_percent != 1.0,
        f"{config.normalization} normalization": config.normalization != "RMSNorm",
        "zero-centred norm weights": config.layernorm_zero_centered_gamma,
        "an MLP other than SwiGLU": not (config.gated_linear_unit
                                        and config.activation_func is F.silu),
        "biases on the projections other than QKV": config.add_bias_linear,
    }
    for feature, present in unsupported.items():
        if present:
            raise UserError(f"generation does not support models with {feature}")


class KVCache:
    """Keys (after RoPE) and values of every layer of this rank's pipeline stage for `slots` rows
    in flight, and the forwards of its layers that use them.

    Args:
        model: this rank's GPTModel stage.
        slots: rows decoded together (the rollout batch size); each slot holds one row at a time.
        max_length: the longest row (context + new tokens) a slot will hold.
        rope: RoPE angles of positions `0..max_length-1`, `[max_length, 1, 1, head dim]`.

    Each layer holds keys and values `[slots + 1, key/value heads per TP rank, max_length, head
    dim]`; row `slots` is a staging row that keeps a context's keys and values for rows admitted
    later (`staging`, `copy`). A slot's cached positions are `0..length-1`; positions past a slot's
    length hold stale values that no query attends to and the next token overwrites.
    """

    def __init__(self, model, slots: int, max_length: int, rope):
        from megatron.core import parallel_state

        check_supported(model)
        config = model.config
        device = next(model.parameters()).device
        self.slots = slots
        self.layers = [_DecodeLayer(layer, config, slots) for layer in model.decoder.layers]
        # zeros, not uninitialised memory: a masked position's key and value still enter the
        # attention products (with weight 0), and 0 * NaN would be NaN
        self.cache = [tuple(torch.zeros((slots + 1, layer.kv_heads, max_length,
                                         config.kv_channels),
                                        dtype=config.params_dtype, device=device)
                            for _ in range(2)) for layer in self.layers]
        final_norm = model.decoder.final_layernorm
        self.final_norm = None if final_norm is None else final_norm.weight.detach()
        self.eps = config.layernorm_epsilon
        self.cos, self.sin = rope.cos().to(config.params_dtype), rope.sin().to(config.params_dtype)
        self.scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None

    @property
    def staging(self) -> int:
        """The cache row that holds a context for later rows, outside the decoded slots."""
        return self.slots

    def prefill(self, hidden, contexts_of_slots, slots):
        """Cache the keys and values of contexts `hidden [L, U, H]` (right-padded; causal
        attention) in the given cache rows: row `slots[i]` receives context
        `contexts_of_slots[i]`'s positions `0..L-1` (those past a context's length are stale).
        Returns the stage's output hidden states `[L, U, H]`."""
        length = hidden.shape[0]
        source = torch.as_tensor(contexts_of_slots, device=hidden.device)
        target = torch.as_tensor(slots, device=hidden.device)
        cos, sin = self.cos[:length], self.sin[:length]

        def attend(keys, values, query, key, value):
            key, value = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [U, kv, L, d]
            keys[target, :, :length] = key[source]
            values[target, :, :length] = value[source]
            return F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), key, value,
                                                  is_causal=True, scale=self.scale,
                                                  enable_gqa=True)

        return self._layers(hidden, cos, sin, attend)

    def decode(self, hidden, positions, keys_used: int):
        """One token per slot, `hidden [1, slots, H]` at `positions [slots]` (each slot's length
        so far): caches its key and value there and attends to the slot's positions
        `0..position`; `keys_used` (> every position) bounds the columns read. Returns `[1, slots,
        H]` (after the final norm on the last stage)."""
        slots = torch.arange(hidden.shape[1], device=hidden.device)
        cos = self.cos[positions].view(1, -1, 1, self.cos.shape[-1])
        sin = self.sin[positions].view(1, -1, 1, self.sin.shape[-1])
        # SDPA's boolean masks mark what may be attended to: each slot's own positions
        allowed = (torch.arange(keys_used, device=hidden.device)[None, :]
                   <= positions[:, None])[:, None, None, :]

        def attend(keys, values, query, key, value):
            keys[slots, :, positions] = key[0]
            values[slots, :, positions] = value[0]
            return F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), keys[:self.slots, :, :keys_used],
                values[:self.slots, :, :keys_used], attn_mask=allowed, scale=self.scale,
                enable_gqa=True)

        return self._layers(hidden, cos, sin, attend)

    def copy(self, source: int, targets, length: int):
        """Cache rows `targets` take cache row `source`'s first `length` positions (a context
        shared by the samples of one prompt)."""
        if length == 0 or len(targets) == 0:
            return
        index = torch.as_tensor(targets, device=self.cache[0][0].device)
        for keys, values in self.cache:
            keys[index, :, :length] = keys[source, :, :length]
            values[index, :, :length] = values[source, :, :length]

    def _layers(self, hidden, cos, sin, attend):
        """This stage's layers on `hidden [s, B, H]`, `attend` caching keys and values and
        returning the attention context `[B, heads, s, d]`; then the final norm, if here. (The
        attention and the MLP are functions of their own, so each one's temporaries are freed
        before the next begins.)"""
        for layer, cache in zip(self.layers, self.cache):
            hidden = hidden + self._attention(layer, cache, hidden, cos, sin, attend)
            hidden = hidden + self._mlp(layer, hidden)
        if self.final_norm is not None:
            hidden = self._norm(hidden, self.final_norm)
        return hidden

    def _attention(self, layer, cache, hidden, cos, sin, attend):
        query, key, value = layer.query_key_value(self._norm(hidden, layer.norm1), self._norm)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)  # [s, B, heads, d]
        context = attend(*cache, query, key, value)
        context = context.permute(2, 0, 1, 3).reshape(hidden.shape[0], hidden.shape[1], -1)
        return self._row_parallel(context, layer.proj)

    def _mlp(self, layer, hidden):
        gate, up = layer.fc1(self._norm(hidden, layer.norm2)).chunk(2, dim=-1)
        return self._row_parallel(F.silu(gate) * up, layer.fc2)

    def _norm(self, x, weight):
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _row_parallel(self, x, linear):
        """A row-parallel linear layer: the local partial product, summed over the TP group."""
        out = linear(x)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class _DecodeLayer:
    """One transformer layer's weights as a decode step of `rows` rows uses them (this rank's
    shards)."""

    def __init__(self, layer, config, rows: int):
        attention, mlp = layer.self_attention, layer.mlp
        self.norm1 = _norm_weight(layer.input_layernorm, attention.linear_qkv)
        self.norm2 = _norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1)
        self.qkv = DecodeLinear(attention.linear_qkv.weight, rows)
        bias = getattr(attention.linear_qkv, "bias", None)
        self.qkv_bias = None if bias is None or bias.numel() == 0 else bias.detach()
        self.q_norm, self.k_norm = (_weight_or_none(attention.q_layernorm),
                                    _weight_or_none(attention.k_layernorm))  # QK norms (Qwen3)
        self.proj = DecodeLinear(attention.linear_proj.weight, rows)
        self.fc1 = DecodeLinear(mlp.linear_fc1.weight, rows)
        self.fc2 = DecodeLinear(mlp.linear_fc2.weight, rows)
        self.kv_heads = attention.num_query_groups_per_partition
        self.heads = attention.num_attention_heads_per_partition
        self.head_dim = config.kv_channels

    def query_key_value(self, hidden, norm):
        """Query `[s, B, heads, d]`, key and value `[s, B, kv heads, d]`, split from the fused
        projection as megatron lays it out: per key/value group, its queries, key and value."""
        mixed = self.qkv(hidden)
        if self.qkv_bias is not None:
            mixed = mixed + self.qkv_bias
        per_group = self.heads // self.kv_heads
        mixed = mixed.view(*mixed.shape[:2], self.kv_heads, per_group + 2, self.head_dim)
        query = mixed[:, :, :, :per_group].reshape(*mixed.shape[:2], self.heads, self.head_dim)
        key, value = mixed[:, :, :, per_group], mixed[:, :, :, per_group + 1]
        if self.q_norm is not None:
            query, key = norm(query, self.q_norm), norm(key, self.k_norm)
        return query, key, value


def _weight_or_none(module):
    """A norm's weight; None for an absent norm (None, or megatron's `IdentityOp`)."""
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach()


def _norm_weight(norm, fused_linear):
    """The weight of a layer's RMSNorm: its own module's (local spec), or the one
    TransformerEngine fuses into the following linear layer (its spec has an identity there)."""
    weight = _weight_or_none(norm)
    return fused_linear.layer_norm_weight.detach() if weight is None else weight


def _rotate(x, cos, sin):
    """RoPE of `x [s, B, heads, d]` with the angles' `cos`/`sin` `[s, 1, 1, d]` (megatron's
    non-interleaved rotation: the halves of the head dimension are the pairs)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
