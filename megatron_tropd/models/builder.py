"""Build megatron-core `GPTModel`s for the student and the teacher, at the current TP/PP layout.

Both models use the same builder; the teacher comes back frozen (eval mode, no gradients). Layout
checks (heads, key/value heads and layers against TP/PP; student vs teacher vocabulary) raise
`ArchitectureError` with a one-line message before megatron-core is asked to build anything.
"""

import torch
import torch.nn.functional as F

from megatron_tropd.models.arch import ArchitectureError, ModelArch
from megatron_tropd.runtime import cpu_compat
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's convention: pad the vocabulary to a multiple of `divisible_by * tp_size`."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def check_parallel_layout(arch: ModelArch, tp_size: int, pp_size: int, role: str = "model"):
    """Raise a one-line `ArchitectureError` if `arch` cannot be split over TP x PP."""
    if arch.num_attention_heads % tp_size != 0:
        raise ArchitectureError(
            f"{role}: attention heads ({arch.num_attention_heads}) are not divisible by "
            f"tensor-model-parallel size {tp_size}"
        )
    if arch.num_query_groups % tp_size != 0:
        raise ArchitectureError(
            f"{role}: key/value heads ({arch.num_query_groups}) are not divisible by "
            f"tensor-model-parallel size {tp_size}"
        )
    if arch.num_layers % pp_size != 0:
        raise ArchitectureError(
            f"{role}: layers ({arch.num_layers}) are not divisible by "
            f"pipeline-model-parallel size {pp_size}"
        )


def check_student_teacher(student: ModelArch, teacher: ModelArch):
    """Student and teacher must share the vocabulary: the loss pairs their vocabulary shards."""
    if student.vocab_size != teacher.vocab_size:
        raise ArchitectureError(
            f"student and teacher vocabularies differ ({student.vocab_size} vs "
            f"{teacher.vocab_size} rows): distillation needs the same tokenizer and vocabulary"
        )


def transformer_config(arch: ModelArch, params_dtype=torch.float32, **overrides):
    """The megatron-core `TransformerConfig` for `arch` at the current parallel layout."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        # micro-batches differ in rows and length (dynamic batching): the pipeline schedule sends
        # each activation's shape before it
        variable_seq_lengths=parallel_state.get_pipeline_model_parallel_world_size() > 1,
        moe_token_dispatcher_type="alltoall",  # the default (allgather) refuses variable lengths,
        #                                        even in a dense model, which dispatches nothing
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, use_transformer_engine: bool = False):
    """The local (pure megatron-core) layer spec with its core attention on torch's fused kernels
    (`models.attention`), or TransformerEngine's when asked for."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        try:
            import transformer_engine  # noqa: F401
        except (ImportError, OSError) as e:
            raise ArchitectureError(
                f"the TransformerEngine layer spec was asked for but transformer_engine does not "
                f"import ({e.__class__.__name__}: {e}); install the 'gpu' extra on a GPU host"
            ) from None
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_layernorm
        )
    from megatron_tropd.models.attention import FusedCausalAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = FusedCausalAttention
    return spec


@cuda_to_cpu()
def build_model(
    arch: ModelArch,
    role: str = "student",
    params_dtype=torch.float32,
    use_transformer_engine: bool = False,
    make_vocab_size_divisible_by: int = 128,
    max_sequence_length=None,
    **config_overrides,
):
    """Build this rank's stage of a GPTModel for `arch` (student or teacher).

    The returned model's logits are vocab-sharded over the TP group (`parallel_output=True`),
    with `padded_vocab_size(arch.vocab_size, tp)` columns in all. A teacher is returned frozen:
    eval mode and `requires_grad=False` on every parameter (it gets no DDP and no optimiser).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', not {role!r}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_layout(arch, tp, pp, role)
    config = transformer_config(arch, params_dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_transformer_engine),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    cpu_compat.scope_forward(model.rotary_pos_emb)
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
    return model
