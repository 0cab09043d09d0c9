"""What one model's pieces take on one tensor-parallel rank, from its architecture alone: the
parameters of a layer and of a pipeline stage, and the elements per token that a layer's forward
holds at once or saves for backward. `megatron_tropd.memory_plan` multiplies them by a run's
shapes and element size.
"""

from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.builder import padded_vocab_size


def layer_linear_params(arch: ModelArch, tp: int) -> int:
    """Weights of one layer's four linear layers (QKV, projection, fc1, fc2) on one TP rank."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    return (h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size) // tp


def layer_params(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    params = layer_linear_params(arch, tp) + 2 * h
    if arch.add_qkv_bias:
        params += (q + 2 * kv) // tp
    if arch.qk_layernorm:
        params += 2 * d
    return params


def stage_params(arch: ModelArch, tp: int, pp: int, stage: int) -> int:
    """Parameters of pipeline stage `stage` on one tensor-parallel rank: its layers, the
    embedding (first stage), the final norm and output layer (last stage; with tied embeddings
    a separate copy only when the last stage is not the first)."""
    vocab_shard = padded_vocab_size(arch.vocab_size, tp) * arch.hidden_size // tp
    params = arch.num_layers // pp * layer_params(arch, tp)
    if stage == 0:
        params += vocab_shard
    if stage == pp - 1:
        params += arch.hidden_size
        if not arch.tie_word_embeddings or pp > 1:
            params += vocab_shard
    return params


def layer_forward_elements(arch: ModelArch, tp: int) -> int:
    """Elements per token alive at once inside one layer's forward when nothing is kept for
    backward (teacher scoring, prefill): the MLP's peak (input, its norm, fc1's `gate | up`,
    silu(gate) and the product, fc2's output) or the attention's (input, norm, fused QKV,
    rotated queries and keys, the context and its projection), whichever is larger."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d // tp, arch.num_query_groups * d // tp
    mlp = 3 * h + 4 * arch.ffn_hidden_size // tp
    attention = 3 * h + (q + 2 * kv) + (q + kv) + 2 * q
    return max(mlp, attention)


def layer_saved_elements(arch: ModelArch, tp: int, composite_norms: bool) -> int:
    """Elements per token one layer keeps for backward in training: the two norms' inputs and
    outputs (4h), the fused QKV output (which the value, a view of it, keeps alive), the rotated
    query and key, attention's output and the projection's input copy of it, and the MLP's
    `gate | up`, silu(gate) and product (4 ffn/tp). Attention's per-head log-sum-exp is below one
    element per token and left out. `composite_norms`: torch's RMSNorm without a fused kernel
    (the CPU) also keeps each norm's normalised input: one more h per norm, and the query and key
    of Qwen3's QK norms."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d // tp, arch.num_query_groups * d // tp
    saved = 4 * h + (q + 2 * kv) + (q + kv) + 2 * q + 4 * arch.ffn_hidden_size // tp
    if composite_norms:
        saved += 2 * h + (q + kv if arch.qk_layernorm else 0)
    return saved
