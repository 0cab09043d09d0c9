"""Tiny GPTModels at TP=2, PP=2 and TP2xPP2 give the same logits and gradients as TP=1 PP=1 with
identical weights, through megatron's forward and through `models.forward.scored_logits` (the
trainer's and the teacher's: logits at scored positions only, against megatron's forward with the
positions selected afterwards); the builder's layout errors are one-line messages."""

import pytest
import torch

from megatron_tropd.models.arch import ArchitectureError, ModelArch
from megatron_tropd.models.builder import check_parallel_layout, check_student_teacher
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.runtime.testing import run_distributed

VOCAB = 500  # padded to 512 at TP=1, 2 and 4, so padded shapes agree across layouts
BATCH, SEQ = 2, 12
ARCHS = {
    "llama_gqa": ModelArch(family="llama", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96,
                           num_layers=4, num_attention_heads=4, num_query_groups=2),
    "qwen2_tied_bias": ModelArch(family="qwen2", vocab_size=VOCAB, hidden_size=64,
                                 ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                                 num_query_groups=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3_qknorm_mha": ModelArch(family="qwen3", vocab_size=VOCAB, hidden_size=64,
                                  ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                                  head_dim=32),
}
# the frozen teacher of the paired forward: another width than the student's, so a mix-up of
# the two models' halves of the pipeline's activations shows
TEACHER = ModelArch(family="qwen3", vocab_size=VOCAB, hidden_size=96, ffn_hidden_size=64,
                    num_layers=2, num_attention_heads=4, num_query_groups=2)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp); (1, 1) for the scored_logits variant


def _inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    weights = torch.randn(BATCH, SEQ, VOCAB, generator=g)  # loss = Σ logits * weights
    return tokens, weights


def _perturb_norms(model):
    """Norm weights away from 1 and biases away from 0, so a wrong mapping of them shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _scored():
    """Scored tokens `[BATCH, SEQ]`: a ragged set, never column 0 (it has no prediction)."""
    mask = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[:, 0] = False
    return mask


@cuda_to_cpu()  # megatron's DDP and schedule, called here as the trainer calls them
def _forward_backward(arch_name, state_dict, forward="all", teacher_sd=None):
    """Build at the current layout (loading `state_dict` if given), run one forward/backward
    through megatron's schedule with DDP and `finalize_model_grads`, as training does; return
    global logits, gradients and the weights used.

    forward: "all", megatron's forward and a loss over every position; "select", megatron's
    forward with the positions predicting `_scored()` tokens selected from its logits;
    "scored_logits", `models.forward.scored_logits` on the same tokens (the same loss);
    "paired", `scored_logits` with the frozen `TEACHER` (weights `teacher_sd`) alongside: the same
    loss on the student's logits, the teacher's logits returned as `teacher_logits`."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_tropd.checkpoint import sharding
    from megatron_tropd.models.builder import build_model

    arch = TEACHER if arch_name == "teacher" else ARCHS[arch_name]
    model = build_model(arch)
    if state_dict is None:
        _perturb_norms(model)
    else:
        sharding.load_global_state_dict(model, state_dict)
    weights_used = sharding.global_state_dict(model, VOCAB)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    from megatron_tropd.models.forward import scored_logits

    teacher = None
    if forward == "paired":
        teacher = build_model(TEACHER, "teacher")
        sharding.load_global_state_dict(teacher, teacher_sd)
    tokens, weights = _inputs()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    scored = _scored()
    if forward != "all":
        weights = weights[:, :-1][scored[:, 1:]]  # [N, VOCAB], row n: the n-th scored token's
    captured = {}

    def loss_func(output):
        if forward == "paired":
            output, teacher_output = output
            captured["teacher_logits"] = gather_from_tensor_model_parallel_region(
                teacher_output)[..., :VOCAB].clone()
        full = gather_from_tensor_model_parallel_region(output)[..., :VOCAB]
        if forward == "select":
            full = full[:, :-1][scored[:, 1:]]
        captured["logits"] = full.detach().clone()
        return (full * weights).sum(), {}

    def forward_step(data_iterator, model):
        if forward in ("scored_logits", "paired"):
            return scored_logits(model, next(data_iterator), scored, teacher), loss_func
        return model(next(data_iterator), positions, None), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    return dict(logits=captured.get("logits"), teacher_logits=captured.get("teacher_logits"),
                weights=weights_used, grads=sharding.global_state_dict(model, VOCAB, grads=True))


def _merged_grads(rank_results):
    """Every pipeline stage's gradients in one dict."""
    grads = {}
    for result in rank_results:
        grads.update(result["grads"])
    return grads


def _assert_close(got, expected, name, rel=1e-5):
    """Max abs difference within `rel` of the reference's largest magnitude (fp32 sums in another
    order differ at that level, elementwise relative tolerance is meaningless near zero)."""
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is zero"
    diff = (got - expected).abs().max().item()
    assert diff <= rel * scale, f"{name}: max |diff| {diff:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="module")
def reference():
    """TP=1 PP=1 runs of every architecture in one process: weights, logits, gradients."""
    return run_distributed(_reference_all, world_size=1)[0]


def _reference_all():
    from megatron_tropd.models.builder import build_model

    teacher = build_model(ARCHS["llama_gqa"], role="teacher")
    frozen = not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = {"teacher_frozen": frozen}
    for name in ARCHS:
        out[name] = _forward_backward(name, None)
        out[f"{name}/scored"] = _forward_backward(name, out[name]["weights"], "select")
    out["teacher"] = _forward_backward("teacher", None, "select")
    return out


def _layout_all(reference):
    out = {}
    for name in ARCHS:
        out[name] = _forward_backward(name, reference[name]["weights"])
        out[f"{name}/scored"] = _forward_backward(name, reference[name]["weights"],
                                                  "scored_logits")
    out["paired"] = _forward_backward("llama_gqa", reference["llama_gqa"]["weights"], "paired",
                                      reference["teacher"]["weights"])
    return out


@pytest.fixture(scope="module")
def layouts(reference):
    return {
        (tp, pp): run_distributed(_layout_all, world_size=tp * pp, tp=tp, pp=pp, args=(reference,))
        for tp, pp in LAYOUTS
    }


@pytest.mark.parametrize("arch_name", [n for a in ARCHS for n in (a, f"{a}/scored")])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_layout_matches_single_process(reference, layouts, arch_name, tp, pp):
    ranks = [r[arch_name] for r in layouts[(tp, pp)]]
    ref = reference[arch_name]
    logits = [r["logits"] for r in ranks if r["logits"] is not None]
    assert len(logits) == tp  # every TP rank of the last stage holds the gathered logits
    for got in logits:
        _assert_close(got, ref["logits"], "logits")
    grads = _merged_grads(ranks)
    assert set(grads) == set(ref["grads"])
    for name, expected in ref["grads"].items():
        _assert_close(grads[name], expected, name)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_paired_teacher_forward(reference, layouts, tp, pp):
    """`scored_logits` with the teacher alongside (its activations travelling the pipeline with
    the student's): the teacher's logits equal its own forward's, the student's logits and
    gradients are those of the student alone."""
    ranks = [r["paired"] for r in layouts[(tp, pp)]]
    for r in ranks:
        if r["logits"] is not None:
            _assert_close(r["logits"], reference["llama_gqa/scored"]["logits"], "student logits")
            _assert_close(r["teacher_logits"], reference["teacher"]["logits"], "teacher logits")
    assert sum(r["teacher_logits"] is not None for r in ranks) == tp
    grads = _merged_grads(ranks)
    for name, expected in reference["llama_gqa/scored"]["grads"].items():
        _assert_close(grads[name], expected, name)


@cuda_to_cpu()  # megatron's own core attention allocates on the current device
def _attention_outputs():
    """megatron's DotProductAttention and our FusedCausalAttention on the same GQA inputs, with
    their input gradients, next to a float64 reference (causal, and with a boolean mask), in fp32
    and bf16."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tropd.models.attention import FusedCausalAttention
    from megatron_tropd.models.builder import transformer_config

    g = torch.Generator().manual_seed(3)
    s, b, heads, groups, d = 10, 2, 4, 2, 16
    q, k, v = (torch.randn(s, b, n, d, generator=g, dtype=torch.float64)
               for n in (heads, groups, groups))
    upstream = torch.randn(s, b, heads * d, generator=g, dtype=torch.float64)
    padding = torch.zeros(b, 1, s, s, dtype=torch.bool)
    padding[1, ..., :3] = True  # row 1: three masked keys (left padding, as megatron masks it)
    masks = {"causal": None, "mask": torch.ones(s, s).triu(1).bool()[None, None] | padding}
    masks["mask"] &= ~torch.eye(s, dtype=torch.bool)  # every query keeps itself

    def reference(mask):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        scores = torch.einsum("sbhd,tbhd->bhst", qq, kk.repeat_interleave(2, 2)) / d ** 0.5
        hidden = torch.ones(s, s).triu(1).bool() if mask is None else mask
        probs = scores.masked_fill(hidden, -torch.inf).softmax(-1)
        out = torch.einsum("bhst,tbhd->sbhd", probs, vv.repeat_interleave(2, 2)).reshape(s, b, -1)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad for x in (qq, kk, vv)]

    results = {}
    arch = ModelArch(family="llama", vocab_size=VOCAB, hidden_size=heads * d, ffn_hidden_size=96,
                     num_layers=1, num_attention_heads=heads, num_query_groups=groups)
    for dtype in (torch.float32, torch.bfloat16):
        config = transformer_config(arch, dtype)
        for name, mask in masks.items():
            expected = reference(mask)
            for cls in (DotProductAttention, FusedCausalAttention):
                module = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             attention_type="self")
                inputs = [x.to(dtype).requires_grad_(True) for x in (q, k, v)]
                out = module(*inputs, mask)
                (out * upstream.to(dtype)).sum().backward()
                results[(dtype, name, cls.__name__)] = (
                    expected, out.detach().double(), [x.grad.double() for x in inputs])
    return results


def test_fused_causal_attention_matches_megatron_and_float64():
    """The local spec's core attention through SDPA equals a float64 computation as megatron's
    own DotProductAttention does, values and gradients, causal and masked, fp32 and bf16."""
    results = run_distributed(_attention_outputs, world_size=1)[0]
    for (dtype, name, cls), ((out64, grads64), out, grads) in results.items():
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        what = f"{cls} {dtype} {name}"
        _assert_close(out, out64, what, rel=tolerance)
        for got, expected in zip(grads, grads64):
            _assert_close(got, expected, what + " gradient", rel=tolerance)


def test_teacher_is_built_frozen(reference):
    assert reference["teacher_frozen"]


# --- one-line errors ---------------------------------------------------------------------------

BASE = dict(family="llama", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_layers=4,
            num_attention_heads=4, num_query_groups=2)


@pytest.mark.parametrize("fields,tp,pp,message", [
    (dict(num_attention_heads=6, num_query_groups=6, hidden_size=96), 4, 1,
     "student: attention heads (6) are not divisible by tensor-model-parallel size 4"),
    (BASE, 4, 1, "student: key/value heads (2) are not divisible by tensor-model-parallel size 4"),
    (BASE, 1, 3, "student: layers (4) are not divisible by pipeline-model-parallel size 3"),
])
def test_layout_errors(fields, tp, pp, message):
    arch = ModelArch(**{**BASE, **fields})
    with pytest.raises(ArchitectureError) as e:
        check_parallel_layout(arch, tp, pp, "student")
    assert str(e.value) == message


def test_transformer_engine_spec_without_te_error():
    from megatron_tropd.models.builder import layer_spec

    try:
        import transformer_engine  # noqa: F401
        pytest.skip("TransformerEngine imports here: the error path is not reachable")
    except (ImportError, OSError):
        pass
    with pytest.raises(ArchitectureError, match=r"^the TransformerEngine layer spec was asked for "
                                                r"but transformer_engine does not import"):
        layer_spec(ModelArch(**BASE), use_transformer_engine=True)


def test_vocabulary_mismatch_error():
    with pytest.raises(ArchitectureError, match=r"^student and teacher vocabularies differ "
                                                r"\(500 vs 512 rows\)"):
        check_student_teacher(ModelArch(**BASE), ModelArch(**{**BASE, "vocab_size": 512}))


def test_unknown_architecture_error():
    with pytest.raises(ArchitectureError) as e:
        ModelArch.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert str(e.value) == "unknown architecture 'gpt2': supported are llama, mistral, qwen2, qwen3"


def test_hf_config_fields():
    """The HF config fields land where megatron needs them (hand-written expectations)."""
    arch = ModelArch.from_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    })
    assert (arch.family, arch.head_dim, arch.num_query_groups, arch.add_qkv_bias,
            arch.qk_layernorm, arch.tie_word_embeddings, arch.rope_theta) == \
        ("qwen2", 64, 2, True, False, True, 1e6)
    llama3 = ModelArch.from_hf_config({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert llama3.rope_scaling_factor == 32.0 and llama3.rms_norm_eps == 1e-5
    assert ModelArch.from_hf_config(llama3.to_hf_config()) == llama3
