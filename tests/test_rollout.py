"""Rollouts and teacher scoring against independent references, at TP=1/2/4, PP=2 and TP2xPP2.

One spawn at TP=1 PP=1 builds the student and teacher, checks generation against full recompute,
a training-mode forward, stop ids and teacher prefixes, and computes the references (greedy and
sampled tokens, teacher signals from gathered full-vocabulary logits with plain torch). Each other
layout is one spawn that loads the same weights (global state dict) and must reproduce them.
"""

import dataclasses
import math

import pytest
import torch

from megatron_tropd.models.arch import ModelArch
from megatron_tropd.testing import merge_reports, run_checks, run_distributed

VOCAB = 250  # padded to 256 (TP=1, 2) and 512 (TP=4: ranks 2 and 3 hold only padding)
ARCH = ModelArch(family="llama", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128,
                 num_layers=2, num_attention_heads=8, num_query_groups=4,
                 max_position_embeddings=64)
PROMPTS = [[17, 3, 99], [5, 6, 7, 8, 9, 10, 11], [4], [120, 121, 9, 33, 201]]
NEW_TOKENS = 10
TOP_K = 8
LP_TOL = 1e-5


def _greedy():
    from megatron_tropd.rollout.generate import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)


def _sampled():
    """Two sampling settings: plain temperature with n samples, and top-k + top-p truncation."""
    from megatron_tropd.rollout.generate import SamplingParams

    return [SamplingParams(temperature=1.0, max_new_tokens=8, n_samples=2, seed=3),
            SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=8, seed=5)]


def _generate(model, params, **kwargs):
    from megatron_tropd.rollout.generate import generate

    return generate(model, PROMPTS, params, VOCAB, **kwargs)


def _model(state_dict, role="student"):
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.models.sharding import load_global_state_dict

    model = build_model(ARCH, role)
    load_global_state_dict(model, state_dict)
    return model


def _training_log_probs(model, batch):
    """Log-probs of every token from a training-mode forward (TP only: no pipeline here)."""
    from megatron_tropd.ops import vocab_parallel as vp

    model.train()
    with torch.no_grad():
        logits = model(batch.tokens, None, batch.attention_mask())
    lp = torch.zeros(batch.tokens.shape, device=logits.device)
    lp[:, 1:] = vp.token_log_probs(logits[:, :-1], batch.tokens[:, 1:], VOCAB)
    return lp


def _assert_lp_matches_training(model, batch):
    expected = _training_log_probs(model, batch) * batch.student_mask
    torch.testing.assert_close(batch.lp_S_old, expected, rtol=0, atol=LP_TOL)


def _guided_prefixes(greedy_batch):
    """Teacher prefixes of 2, 0, 5 and 1 tokens cut from the greedy responses."""
    return [r[:n] for r, n in zip(greedy_batch.responses(), (2, 0, 5, 1))]


# --- the TP=1 PP=1 reference spawn ----------------------------------------------------------------


def check_kv_cache_equals_recompute(ctx):
    cached, recomputed = ctx["greedy"], _generate(ctx["student"], _greedy(), use_kv_cache=False)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.equal(cached.student_mask, recomputed.student_mask)
    torch.testing.assert_close(cached.lp_S_old, recomputed.lp_S_old, rtol=0, atol=LP_TOL)
    # left padding: every prompt ends at the same column, the responses start there
    assert cached.context_width == max(len(p) for p in PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        assert cached.tokens[row, cached.context_width - len(prompt):cached.context_width].tolist() \
            == prompt
    assert cached.student_mask.sum(1).tolist() == [NEW_TOKENS] * len(PROMPTS)


def check_lp_old_equals_training_forward(ctx):
    for batch in (ctx["greedy"], *ctx["sampled"], ctx["guided"]):
        _assert_lp_matches_training(ctx["student"], batch)


def check_stop_ids_end_rows(ctx):
    """With a stop id, each row is the stop-free greedy row cut just after the stop id's first
    occurrence; nothing after it is a student token or anything but padding."""
    greedy = ctx["greedy"]
    stop = greedy.responses()[0][3]
    stopped = _generate(ctx["student"], dataclasses.replace(_greedy(), stop_ids=(stop,)), pad_id=0)
    width = greedy.context_width
    cut_rows = 0
    for row in range(len(PROMPTS)):
        full = greedy.tokens[row, width:].tolist()
        n = full.index(stop) + 1 if stop in full else len(full)
        cut_rows += n < len(full)
        got = stopped.tokens[row, width:]
        assert got[:n].tolist() == full[:n]
        assert (got[n:] == 0).all()
        assert stopped.student_mask[row, width:width + n].all()
        assert not stopped.student_mask[row, width + n:].any()
        assert (stopped.lp_S_old[row, width + n:] == 0).all()
        assert stopped.padding[row, width + n:].all()
    assert cut_rows >= 1
    assert stopped.tokens.shape[1] < greedy.tokens.shape[1] or cut_rows < len(PROMPTS)


def check_teacher_prefix_continuation(ctx):
    """Greedy continuation of the model's own greedy prefix is the rest of its greedy response;
    prefix tokens are recorded as such, never as student tokens."""
    greedy, guided = ctx["greedy"], ctx["guided"]
    prefixes = _guided_prefixes(greedy)
    for row, prefix in enumerate(prefixes):
        assert guided.responses()[row][:NEW_TOKENS] == greedy.responses()[row]
        prefix_cols = guided.prefix_mask[row].nonzero().flatten().tolist()
        assert [guided.tokens[row, c].item() for c in prefix_cols] == prefix
        assert prefix_cols == list(range(guided.context_width - len(prefix), guided.context_width))
        assert not (guided.prefix_mask[row] & guided.student_mask[row]).any()
        assert guided.student_mask[row].sum() == NEW_TOKENS
    assert guided.prefix_lengths.tolist() == [len(p) for p in prefixes]
    assert (guided.lp_S_old[guided.prefix_mask] == 0).all()


def check_prefix_ending_in_stop_samples_nothing(ctx):
    from megatron_tropd.rollout.generate import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=4, stop_ids=(7,))
    batch = _generate(ctx["student"], params, prefixes=[[1, 7], [], [2], [3, 7]])
    assert batch.student_mask.sum(1)[[0, 3]].tolist() == [0, 0]
    assert batch.student_mask.sum(1)[[1, 2]].min() >= 1
    assert batch.responses()[0] == [1, 7]


def check_generation_errors(ctx):
    from megatron_tropd.rollout.generate import GenerationError, SamplingParams, generate

    model = ctx["student"]
    with pytest.raises(GenerationError, match="exceeds the model's maximum sequence length 64"):
        generate(model, [[1] * 60], SamplingParams(max_new_tokens=5), VOCAB)
    with pytest.raises(GenerationError, match=r"token ids must lie in \[0, 250\)"):
        generate(model, [[1, 250]], SamplingParams(max_new_tokens=5), VOCAB)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[1], []], SamplingParams(max_new_tokens=5), VOCAB)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0.0)


def check_teacher_signals_at_tp1(ctx):
    _assert_signals_match(ctx["teacher"], ctx["scored"], ctx["signals_reference"])


def check_offline_teacher_responses_tool(ctx):
    """tools/generate_teacher_responses.py, at this spawn's layout (data parallelism included),
    writes the responses the teacher samples online in one call."""
    import importlib.util
    import json
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.data import load_teacher_responses
    from megatron_tropd.rollout.generate import SamplingParams
    from megatron_tropd.rollout.teacher_responses import (
        lookup_teacher_responses, online_teacher_responses)

    spec = importlib.util.spec_from_file_location(
        "generate_teacher_responses",
        os.path.join(os.path.dirname(__file__), "..", "tools", "generate_teacher_responses.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    paths = {name: os.path.join(ctx["tmp"], name)
             for name in ("arch.json", "weights.pt", "prompts.jsonl", "out.jsonl")}
    if dist.get_rank() == 0:
        with open(paths["arch.json"], "w") as f:
            json.dump(dict(vars(ARCH)), f)
        torch.save(ctx["teacher_sd"], paths["weights.pt"])
        with open(paths["prompts.jsonl"], "w") as f:
            f.writelines(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS)
    dist.barrier()
    tool.main(["--model-config", paths["arch.json"], "--weights", paths["weights.pt"],
               "--prompts", paths["prompts.jsonl"], "--output", paths["out.jsonl"],
               "--tp", str(ps.get_tensor_model_parallel_world_size()),
               "--pp", str(ps.get_pipeline_model_parallel_world_size()),
               "--temperature", "1", "--seed", "11", "--max-new-tokens", str(NEW_TOKENS),
               "--batch-size", "3"])
    offline = lookup_teacher_responses(load_teacher_responses(paths["out.jsonl"]), PROMPTS)
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=NEW_TOKENS)
    assert offline == online_teacher_responses(ctx["teacher"], PROMPTS, params, VOCAB)


def check_samples_independent_of_data_parallel_split(ctx):
    """Rows keep their samples when the prompts are split over two calls (two data-parallel
    ranks) with the matching `sample_offset`."""
    from megatron_tropd.rollout.generate import generate

    params = _sampled()[0]
    whole = ctx["sampled"][0]
    n = params.n_samples
    for first, last in ((0, 2), (2, 4)):
        part = generate(ctx["student"], PROMPTS[first:last], params, VOCAB, sample_offset=first * n)
        for row in range(part.tokens.shape[0]):
            assert whole.responses()[first * n + row] == part.responses()[row]


def check_other_families_cache_equals_recompute(ctx):
    """Qwen2 (QKV bias) and Qwen3 (q/k norms, tied embeddings): the cached forward composes the
    layers itself, so it must match megatron's forward for them too."""
    from megatron_tropd.models.builder import build_model

    for family, tied in (("qwen2", False), ("qwen3", True)):
        model = build_model(dataclasses.replace(ARCH, family=family, tie_word_embeddings=tied))
        cached = _generate(model, _greedy())
        assert torch.equal(cached.tokens, _generate(model, _greedy(), use_kv_cache=False).tokens)
        sampled = _generate(model, _sampled()[0])
        torch.testing.assert_close(
            sampled.lp_S_old, _generate(model, _sampled()[0], use_kv_cache=False).lp_S_old,
            rtol=0, atol=LP_TOL)


REFERENCE_CHECKS = [
    check_kv_cache_equals_recompute, check_lp_old_equals_training_forward,
    check_stop_ids_end_rows, check_teacher_prefix_continuation,
    check_prefix_ending_in_stop_samples_nothing, check_generation_errors,
    check_teacher_signals_at_tp1, check_offline_teacher_responses_tool,
    check_samples_independent_of_data_parallel_split, check_other_families_cache_equals_recompute,
]


def _full_vocab_signals(teacher, batch):
    """The teacher's signals from its full logits (TP=1, PP=1) with plain torch: the reference."""
    teacher.eval()
    with torch.no_grad():
        logits = teacher(batch.tokens, None, batch.attention_mask())[..., :VOCAB].double()
    log_probs = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    log_probs[:, 1:] = torch.log_softmax(logits[:, :-1], dim=-1)
    mask = batch.response_mask
    topk_lp, topk_ids = log_probs.topk(TOP_K, dim=-1)
    return dict(
        mask=mask,
        token_log_probs=log_probs.gather(-1, batch.tokens[..., None])[..., 0] * mask,
        topk_log_probs=topk_lp * mask[..., None],
        topk_ids=topk_ids * mask[..., None],
        entropy=-(log_probs.exp() * log_probs).sum(-1) * mask,
        log_probs=log_probs * mask[..., None],
    )


def _assert_signals_match(teacher, batch, reference):
    """`distill.teacher.score` at this layout equals the full-vocabulary reference (last stage)."""
    from megatron.core import parallel_state as ps

    from megatron_tropd.distill.teacher import score
    from megatron_tropd.models.builder import padded_vocab_size

    signals = score(teacher, batch, VOCAB, top_k=TOP_K, full_log_probs=True, micro_batch_size=2)
    if not ps.is_pipeline_last_stage():
        assert signals is None
        return
    assert torch.equal(signals.mask, reference["mask"])
    assert torch.equal(signals.topk_ids, reference["topk_ids"])
    for name in ("token_log_probs", "topk_log_probs", "entropy"):
        torch.testing.assert_close(getattr(signals, name).double(), reference[name],
                                   rtol=0, atol=LP_TOL, msg=name)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = padded_vocab_size(VOCAB, tp) // tp
    expected = torch.zeros(batch.tokens.shape + (local,), dtype=torch.float64,
                           device=signals.log_probs.device)
    valid = max(0, min(local, VOCAB - rank * local))
    expected[..., :valid] = reference["log_probs"][..., rank * local:rank * local + valid]
    shard = signals.log_probs.double()
    torch.testing.assert_close(shard[..., :valid], expected[..., :valid], rtol=0, atol=LP_TOL)
    assert torch.isneginf(shard[..., valid:][reference["mask"]]).all()


def _reference_run(tmp):
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.models.sharding import global_state_dict

    student = build_model(ARCH, "student")
    teacher = build_model(ARCH, "teacher")  # initialised after the student: other weights
    greedy = _generate(student, _greedy())
    sampled = [_generate(student, p) for p in _sampled()]
    guided = _generate(student, _greedy(), prefixes=_guided_prefixes(greedy))
    # the batch the teacher scores: prompts + teacher prefixes + the student's sampled tokens
    scored = _generate(student, _sampled()[1], prefixes=_guided_prefixes(greedy))
    ctx = dict(student=student, teacher=teacher, greedy=greedy, sampled=sampled, guided=guided,
               scored=scored, teacher_sd=global_state_dict(teacher, VOCAB),
               signals_reference=_full_vocab_signals(teacher, scored), tmp=tmp)
    report = run_checks(REFERENCE_CHECKS, ctx)
    shared = dict(student_sd=global_state_dict(student, VOCAB), teacher_sd=ctx["teacher_sd"],
                  greedy=greedy, sampled=sampled, scored=scored,
                  signals_reference=ctx["signals_reference"])
    return report, shared


# --- the other layouts ----------------------------------------------------------------------------


def check_greedy_matches_reference(ctx):
    ref = ctx["ref"]["greedy"]
    for use_kv_cache in (True, False):
        batch = _generate(ctx["student"], _greedy(), use_kv_cache=use_kv_cache)
        assert torch.equal(batch.tokens, ref.tokens), f"use_kv_cache={use_kv_cache}"
        assert torch.equal(batch.student_mask, ref.student_mask)
        torch.testing.assert_close(batch.lp_S_old, ref.lp_S_old, rtol=0, atol=LP_TOL)


def check_sampled_matches_reference(ctx):
    for params, ref in zip(_sampled(), ctx["ref"]["sampled"]):
        batch = _generate(ctx["student"], params)
        assert torch.equal(batch.tokens, ref.tokens), params
        torch.testing.assert_close(batch.lp_S_old, ref.lp_S_old, rtol=0, atol=LP_TOL)


def check_lp_old_equals_training_forward_tp(ctx):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        _assert_lp_matches_training(ctx["student"], _generate(ctx["student"], _sampled()[0]))


def check_teacher_signals_match_full_vocab(ctx):
    _assert_signals_match(ctx["teacher"], ctx["ref"]["scored"], ctx["ref"]["signals_reference"])


LAYOUT_CHECKS = [check_greedy_matches_reference, check_sampled_matches_reference,
                 check_lp_old_equals_training_forward_tp, check_teacher_signals_match_full_vocab,
                 check_other_families_cache_equals_recompute, check_offline_teacher_responses_tool]
LAYOUTS = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2pp2": (4, 2, 2), "tp4": (4, 4, 1),
           "dp2": (2, 1, 1)}  # world size, TP, PP


def _layout_run(ref, tmp):
    ctx = dict(ref=ref, student=_model(ref["student_sd"]), teacher_sd=ref["teacher_sd"],
               teacher=_model(ref["teacher_sd"], "teacher"), tmp=tmp)
    return run_checks(LAYOUT_CHECKS, ctx)


# --- pytest -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("reference"))
    report, shared = run_distributed(_reference_run, world_size=1, args=(tmp,))[0]
    return report, shared


@pytest.fixture(scope="module")
def layouts(reference, tmp_path_factory):
    _, shared = reference
    return {
        name: merge_reports(run_distributed(_layout_run, world, tp, pp, args=(
            shared, str(tmp_path_factory.mktemp(name)))))
        for name, (world, tp, pp) in LAYOUTS.items()
    }


@pytest.mark.parametrize("check", [c.__name__ for c in REFERENCE_CHECKS])
def test_reference_layout(reference, check):
    error = reference[0][check]
    assert error is None, error


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("check", [c.__name__ for c in LAYOUT_CHECKS])
def test_parallel_layout(layouts, layout, check):
    error = layouts[layout][check]
    assert error is None, error


def test_sampled_rows_differ(reference):
    """The sampled references are real samples: the n samples of a prompt differ."""
    batch = reference[1]["sampled"][0]
    assert not torch.equal(batch.tokens[0], batch.tokens[1])


def test_prefix_schedule():
    from megatron_tropd.rollout.prefix import prefix_fraction, prefix_length, teacher_prefixes

    assert prefix_fraction(0, 200) == 1.0
    assert prefix_fraction(100, 200) == pytest.approx(0.5)
    assert prefix_fraction(50, 200) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert prefix_fraction(200, 200) == 0.0 and prefix_fraction(500, 200) == 0.0
    assert [prefix_length(10, s, 200) for s in (0, 50, 100, 150, 199, 200)] == [10, 8, 5, 1, 0, 0]
    assert teacher_prefixes([[1, 2, 3, 4], [5, 6]], 100, 200) == [[1, 2], [5]]
    with pytest.raises(ValueError, match="anneal_steps"):
        prefix_fraction(1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 96), (8, 96), (1, 1, 96), (5, 8, 96), (3, 96)])
def test_decode_linear(shape, dtype):
    """The decode products (float32 weights MKL-packed for 8 rows where torch has MKL; every other
    row count, dtype and device through the plain weight) equal `F.linear` on the same weight."""
    from megatron_tropd.rollout.kv_cache import DecodeLinear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 96, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    linear = DecodeLinear(weight, rows=8)
    assert (linear.packed is not None) == (dtype == torch.float32
                                           and torch.backends.mkl.is_available())
    out = linear(x)
    expected = torch.nn.functional.linear(x.double(), weight.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == shape[:-1] + (200,) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * 10)
