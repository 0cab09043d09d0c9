"""Rollouts and teacher scoring against independent references, at TP=1/2/4, PP=2 and TP2xPP2.

One spawn at TP=1 PP=1 builds the student and teacher and checks the engine (KV cache, continuous
batching through fewer slots than rows, shared prefill, prefill budgets) against full recompute
with megatron's forward, against the layout before rows started at column 0 (left-padded
contexts under an explicit padding mask), a training-mode forward, stop ids and teacher prefixes;
it computes the references (greedy and sampled tokens, teacher signals from each row's
full-vocabulary logits with plain torch). Each other layout is one spawn that loads the same
weights (global state dict) and must reproduce them.
"""

import dataclasses
import math

import pytest
import torch

from megatron_tropd.models.arch import ModelArch
from megatron_tropd.runtime.testing import merge_reports, run_checks, run_distributed

VOCAB = 250  # padded to 256 (TP=1, 2) and 512 (TP=4: ranks 2 and 3 hold only padding)
ARCH = ModelArch(family="llama", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128,
                 num_layers=2, num_attention_heads=8, num_query_groups=4,
                 max_position_embeddings=64)
PROMPTS = [[17, 3, 99], [5, 6, 7, 8, 9, 10, 11], [4], [120, 121, 9, 33, 201]]
NEW_TOKENS = 10
TOP_K = 8
LP_TOL = 1e-5
# About one id in six ends a row: sampled rows get lengths from 1 to the limit.
STOPS = tuple(range(5, VOCAB, 6))
# (rollout batch size, prefill token budget) of the engine: all rows at once, one slot (every row
# admitted alone, samples of a prompt from the staging row), and few slots with small prefills.
ENGINES = [(None, None), (1, None), (2, 6), (5, 4)]


def _greedy():
    from megatron_tropd.rollout.generate import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)


def _sampled():
    """Three sampling settings: temperature with n samples and stop ids (rows of many lengths),
    top-k + top-p truncation, and a low temperature."""
    from megatron_tropd.rollout.generate import SamplingParams

    return [SamplingParams(temperature=1.0, max_new_tokens=8, n_samples=3, seed=3, stop_ids=STOPS),
            SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=8, seed=5),
            SamplingParams(temperature=0.5, max_new_tokens=6, n_samples=2, seed=9,
                           stop_ids=STOPS)]


def _generate(model, params, **kwargs):
    from megatron_tropd.rollout.generate import generate

    return generate(model, PROMPTS, params, VOCAB, **kwargs)


def _model(state_dict, role="student"):
    from megatron_tropd.checkpoint.sharding import load_global_state_dict
    from megatron_tropd.models.builder import build_model

    model = build_model(ARCH, role)
    load_global_state_dict(model, state_dict)
    return model


def _assert_same_rollout(got, expected, what=""):
    """Equal sequences and record, log-probs and entropies within LP_TOL."""
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in expected.sequences], what
    assert got.prompt_lengths == expected.prompt_lengths and \
        got.prefix_lengths == expected.prefix_lengths and got.sample_ids == expected.sample_ids
    assert torch.equal(got.record.ids, expected.record.ids), what
    assert torch.equal(got.record.on_policy, expected.record.on_policy), what
    for name in ("old_logprobs", "student_entropy"):
        torch.testing.assert_close(getattr(got.record, name), getattr(expected.record, name),
                                   rtol=0, atol=LP_TOL, msg=f"{what} {name}")


def _training_log_probs(model, batch):
    """Log-prob of every response token from a training-mode forward of its row alone (TP only:
    no pipeline here)."""
    from megatron_tropd.ops import vocab_parallel as vp

    model.train()
    out = []
    with torch.no_grad():
        for sequence, prompt in zip(batch.sequences, batch.prompt_lengths):
            logits = model(sequence[None], None, None)[0]
            out.append(vp.token_log_probs(logits[prompt - 1:-1], sequence[prompt:], VOCAB))
    model.eval()
    return torch.cat(out)


def _assert_lp_matches_training(model, batch):
    expected = _training_log_probs(model, batch) * batch.record.on_policy
    torch.testing.assert_close(batch.record.old_logprobs, expected, rtol=0, atol=LP_TOL)


def _guided_prefixes(greedy_batch):
    """Teacher prefixes of 2, 0, 5 and 1 tokens cut from the greedy responses."""
    return [r[:n] for r, n in zip(greedy_batch.responses(), (2, 0, 5, 1))]


def _left_padded_generate(model, params, prefixes=None):
    """The engine before rows started at column 0, as a reference: contexts left-padded to end at one
    column, megatron's forward of the whole batch at every step under an explicit causal + padding
    mask, draws keyed by (seed, sample id, response position). Returns each row's response."""
    from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
    from megatron_tropd.ops.sampling import sample

    prefixes = prefixes or [[]] * len(PROMPTS)
    contexts, sample_ids, prefix_lengths, responses = [], [], [], []
    for i, (prompt, prefix) in enumerate(zip(PROMPTS, prefixes)):
        for j in range(params.n_samples):
            contexts.append(prompt + list(prefix))
            sample_ids.append(i * params.n_samples + j)
            prefix_lengths.append(len(prefix))
            responses.append(list(prefix))
    device = next(model.parameters()).device
    width = max(len(c) for c in contexts)
    tokens = torch.zeros((len(contexts), width + params.max_new_tokens), dtype=torch.long,
                         device=device)
    padding = torch.zeros(tokens.shape, dtype=torch.bool, device=device)
    for row, context in enumerate(contexts):
        tokens[row, width - len(context):width] = torch.tensor(context)
        padding[row, :width - len(context)] = True
    done = torch.zeros(len(contexts), dtype=torch.bool, device=device)
    model.eval()
    for step in range(params.max_new_tokens):
        end = width + step
        keys = torch.arange(end, device=device)
        hidden = (keys[None, :] > keys[:, None])[None, None] | padding[:, None, None, :end]
        hidden &= keys[None, :] != keys[:, None]  # a padding query attends to itself
        with torch.no_grad():
            logits = model(tokens[:, :end], None, hidden)[:, -1]
        uniforms = uniform_from_keys(sampling_keys(
            params.seed, torch.tensor(sample_ids, device=device),
            torch.tensor(prefix_lengths, device=device) + step))
        ids = sample(logits, VOCAB, uniforms, params.temperature, params.top_k, params.top_p)
        tokens[:, end] = ids
        for row in range(len(contexts)):
            if not done[row]:
                responses[row].append(int(ids[row]))
        done |= torch.isin(ids, torch.tensor(params.stop_ids, dtype=torch.long, device=device))
        if done.all():
            break
    return responses


# --- the TP=1 PP=1 reference spawn ----------------------------------------------------------------


def check_engine_equals_recompute(ctx):
    """Every engine setting gives the ids of full recompute, lp_S_old and entropy within LP_TOL:
    greedy, sampled with stop ids, truncated sampling, guided rows."""
    student = ctx["student"]
    cases = [(_greedy(), None)] + [(p, None) for p in _sampled()] + \
        [(_sampled()[0], _guided_prefixes(ctx["greedy"]))]
    for params, prefixes in cases:
        reference = _generate(student, params, prefixes=prefixes, use_kv_cache=False,
                              record_entropy=True)
        for slots, budget in ENGINES:
            got = _generate(student, params, prefixes=prefixes, record_entropy=True,
                            rollout_batch_size=slots, max_prefill_tokens=budget)
            _assert_same_rollout(got, reference, f"{params} slots={slots} budget={budget}")
    # the rows of the sampled case really differ in length and the layout starts at column 0
    lengths = ctx["sampled"][0].student_lengths
    assert min(lengths) < max(lengths) == 8
    for sequence, prompt in zip(ctx["greedy"].sequences, PROMPTS):
        assert sequence[:len(prompt)].tolist() == prompt and len(sequence) == len(prompt) + 10


def check_engine_equals_left_padded_layout(ctx):
    """The same responses as the former left-padded engine (positions shift, so only rounding may
    differ): greedy, sampled with stop ids, guided."""
    student = ctx["student"]
    prefixes = _guided_prefixes(ctx["greedy"])
    for params, prefix in ((_greedy(), None), (_sampled()[0], None), (_sampled()[0], prefixes)):
        got = _generate(student, params, prefixes=prefix, rollout_batch_size=2).responses()
        assert got == _left_padded_generate(student, params, prefix), params


def check_shared_prefill(ctx):
    """The samples of a prompt share one prefill, also when they are admitted at different steps
    (one slot): the tokens prefilled are each distinct context once, minus its last token."""
    from megatron_tropd.rollout.stage import GenerationStage

    prefilled = []
    original = GenerationStage.prefill

    def counting(self, kv_cache, tokens, contexts_of_slots, slots):
        prefilled.append(tokens.shape[0])
        return original(self, kv_cache, tokens, contexts_of_slots, slots)

    GenerationStage.prefill = counting
    try:
        for slots in (None, 1, 2):
            prefilled.clear()
            _generate(ctx["student"], _sampled()[0], rollout_batch_size=slots)
            assert sum(prefilled) == sum(len(p) > 1 for p in PROMPTS), (slots, prefilled)
    finally:
        GenerationStage.prefill = original


def check_lp_old_equals_training_forward(ctx):
    for batch in (ctx["greedy"], *ctx["sampled"], ctx["guided"]):
        _assert_lp_matches_training(ctx["student"], batch)


def check_stop_ids_end_rows(ctx):
    """With a stop id, each row is the stop-free greedy row cut just after the stop id's first
    occurrence."""
    greedy = ctx["greedy"]
    stop = greedy.responses()[0][3]
    stopped = _generate(ctx["student"], dataclasses.replace(_greedy(), stop_ids=(stop,)))
    cut_rows = 0
    for row, response in enumerate(greedy.responses()):
        n = response.index(stop) + 1 if stop in response else len(response)
        cut_rows += n < len(response)
        assert stopped.responses()[row] == response[:n]
        assert stopped.student_lengths[row] == n
    assert cut_rows >= 1


def check_teacher_prefix_continuation(ctx):
    """Greedy continuation of the model's own greedy prefix is the rest of its greedy response;
    prefix tokens are recorded as such (not on-policy, lp_S_old 0), never as student tokens."""
    greedy, guided = ctx["greedy"], ctx["guided"]
    prefixes = _guided_prefixes(greedy)
    record_rows = guided.record_rows()
    for row, prefix in enumerate(prefixes):
        assert guided.responses()[row][:NEW_TOKENS] == greedy.responses()[row]
        mine = record_rows == row
        assert guided.record.ids[mine].tolist() == guided.responses()[row]
        assert guided.record.on_policy[mine].tolist() == [False] * len(prefix) + [True] * 10
        assert guided.student_lengths[row] == NEW_TOKENS
    assert guided.prefix_lengths == [len(p) for p in prefixes]
    assert (guided.record.old_logprobs[guided.record.prefix] == 0).all()
    assert guided.record_positions()[record_rows == 2].tolist() == list(range(15))


def check_prefix_ending_in_stop_samples_nothing(ctx):
    from megatron_tropd.rollout.generate import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=4, stop_ids=(7,))
    for slots in (None, 1):
        batch = _generate(ctx["student"], params, prefixes=[[1, 7], [], [2], [3, 7]],
                          rollout_batch_size=slots)
        assert [batch.student_lengths[r] for r in (0, 3)] == [0, 0]
        assert min(batch.student_lengths[r] for r in (1, 2)) >= 1
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
    with pytest.raises(GenerationError, match="rollout_batch_size must be >= 1, got 0"):
        generate(model, [[1]], SamplingParams(max_new_tokens=5), VOCAB, rollout_batch_size=0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0.0)


def check_teacher_signals_at_tp1(ctx):
    _assert_signals_match(ctx["teacher"], ctx["scored"], ctx["signals_reference"])


def check_offline_teacher_responses_tool(ctx):
    """tools/generate_teacher_responses.py, at this spawn's layout (data parallelism included), on
    the teacher saved as a Megatron checkpoint: writes the responses the teacher samples online in
    one call."""
    import importlib.util
    import json
    import os

    import sentencepiece as spm
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.checkpoint.model_dir import save_model
    from megatron_tropd.data import load_teacher_responses
    from megatron_tropd.rollout.generate import SamplingParams
    from megatron_tropd.rollout.teacher_responses import (lookup_teacher_responses,
                                                          online_teacher_responses)

    spec = importlib.util.spec_from_file_location(
        "generate_teacher_responses",
        os.path.join(os.path.dirname(__file__), "..", "tools", "generate_teacher_responses.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    paths = {name: os.path.join(ctx["tmp"], name)
             for name in ("teacher", "tok", "prompts.jsonl", "out.jsonl")}
    save_model(paths["teacher"], ctx["teacher"], ARCH)  # collective, at this layout
    if dist.get_rank() == 0:  # a tokenizer for the texts written next to the ids
        with open(paths["tok"] + ".txt", "w") as f:
            f.write("0123456789+=\n" * 20)
        spm.SentencePieceTrainer.train(input=paths["tok"] + ".txt", model_prefix=paths["tok"],
                                       vocab_size=16, model_type="char", minloglevel=2,
                                       hard_vocab_limit=False)
        with open(paths["prompts.jsonl"], "w") as f:
            f.writelines(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS)
    dist.barrier()
    tool.main(["--load", paths["teacher"], "--tokenizer", paths["tok"] + ".model",
               "--prompts", paths["prompts.jsonl"], "--output", paths["out.jsonl"],
               "--tp", str(ps.get_tensor_model_parallel_world_size()),
               "--pp", str(ps.get_pipeline_model_parallel_world_size()), "--stop-ids",
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
    whole = ctx["sampled"][0].responses()
    n = params.n_samples
    for first, last in ((0, 2), (2, 4)):
        part = generate(ctx["student"], PROMPTS[first:last], params, VOCAB,
                        sample_offset=first * n, rollout_batch_size=2)
        assert part.responses() == whole[first * n:last * n]


def check_other_families_engine_equals_recompute(ctx):
    """Qwen2 (QKV bias) and Qwen3 (q/k norms, tied embeddings): the cached forward composes the
    layers itself, so it must match megatron's forward for them too."""
    from megatron_tropd.models.builder import build_model

    for family, tied in (("qwen2", False), ("qwen3", True)):
        model = build_model(dataclasses.replace(ARCH, family=family, tie_word_embeddings=tied))
        for params in (_greedy(), _sampled()[0]):
            _assert_same_rollout(_generate(model, params, rollout_batch_size=2),
                                 _generate(model, params, use_kv_cache=False), family)


REFERENCE_CHECKS = [
    check_engine_equals_recompute, check_engine_equals_left_padded_layout, check_shared_prefill,
    check_lp_old_equals_training_forward, check_stop_ids_end_rows,
    check_teacher_prefix_continuation, check_prefix_ending_in_stop_samples_nothing,
    check_generation_errors, check_teacher_signals_at_tp1, check_offline_teacher_responses_tool,
    check_samples_independent_of_data_parallel_split, check_other_families_engine_equals_recompute,
]


def _full_vocab_signals(teacher, batch):
    """The teacher's signals of every response token from each row's full logits (TP=1, PP=1)
    with plain torch in float64: the reference."""
    teacher.eval()
    out = {name: [] for name in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_topk_ids",
                                 "teacher_entropy")}
    with torch.no_grad():
        for sequence, prompt in zip(batch.sequences, batch.prompt_lengths):
            logits = teacher(sequence[None], None, None)[0, prompt - 1:-1, :VOCAB].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            topk_lp, topk_ids = log_probs.topk(TOP_K, dim=-1)
            out["teacher_logprobs"].append(log_probs.gather(-1, sequence[prompt:, None])[:, 0])
            out["teacher_topk_logprobs"].append(topk_lp)
            out["teacher_topk_ids"].append(topk_ids)
            out["teacher_entropy"].append(-(log_probs.exp() * log_probs).sum(-1))
    return {name: torch.cat(values) for name, values in out.items()}


def _assert_signals_match(teacher, batch, reference):
    """`distill.teacher.score` at this layout, over micro-batches of at most 2 rows and 14
    tokens, fills the record with the full-vocabulary reference (last stage)."""
    from megatron.core import parallel_state as ps

    from megatron_tropd.distill.teacher import score
    from megatron_tropd.tokens import plan_micro_batches

    batch = dataclasses.replace(batch, record=dataclasses.replace(batch.record))
    plan = plan_micro_batches(batch.lengths, 2, 14)
    assert len(plan) > len(batch.sequences) / 2  # the budget splits some pairs
    score(teacher, batch, [batch.micro_batch(rows, 0) for rows in plan], VOCAB, TOP_K)
    if not ps.is_pipeline_last_stage():
        assert batch.record.teacher_logprobs is None
        return
    assert torch.equal(batch.record.teacher_topk_ids.long(), reference["teacher_topk_ids"])
    for name in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy"):
        torch.testing.assert_close(getattr(batch.record, name).double(), reference[name],
                                   rtol=0, atol=LP_TOL, msg=name)


def _reference_run(tmp):
    from megatron_tropd.checkpoint.sharding import global_state_dict
    from megatron_tropd.models.builder import build_model

    student = build_model(ARCH, "student")
    teacher = build_model(ARCH, "teacher")  # initialised after the student: other weights
    greedy = _generate(student, _greedy())
    sampled = [_generate(student, p, record_entropy=True) for p in _sampled()]
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
        batch = _generate(ctx["student"], _greedy(), use_kv_cache=use_kv_cache,
                          rollout_batch_size=3)
        _assert_same_rollout(batch, ref, f"use_kv_cache={use_kv_cache}")


def check_sampled_matches_reference(ctx):
    for params, ref in zip(_sampled(), ctx["ref"]["sampled"]):
        for slots, budget in ENGINES[1:3]:
            batch = _generate(ctx["student"], params, record_entropy=True,
                              rollout_batch_size=slots, max_prefill_tokens=budget)
            _assert_same_rollout(batch, ref, f"{params} slots={slots}")


def check_lp_old_equals_training_forward_tp(ctx):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        _assert_lp_matches_training(ctx["student"], _generate(ctx["student"], _sampled()[0]))


def check_teacher_signals_match_full_vocab(ctx):
    _assert_signals_match(ctx["teacher"], ctx["ref"]["scored"], ctx["ref"]["signals_reference"])


LAYOUT_CHECKS = [check_greedy_matches_reference, check_sampled_matches_reference,
                 check_lp_old_equals_training_forward_tp, check_teacher_signals_match_full_vocab,
                 check_other_families_engine_equals_recompute, check_offline_teacher_responses_tool]
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
    assert batch.responses()[0] != batch.responses()[1]


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
    from megatron_tropd.runtime.cpu_speedups import DecodeLinear

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


def test_micro_batch_plan():
    """Longest rows first; a micro-batch stops at the row cap or the token budget (rows x its
    longest row); a row over the budget goes alone; every row once."""
    from megatron_tropd.tokens import plan_micro_batches

    lengths = [5, 9, 3, 9, 20, 4, 4]
    assert plan_micro_batches(lengths, 3) == [[4, 1, 3], [0, 5, 6], [2]]
    assert plan_micro_batches(lengths, 100, 18) == [[4], [1, 3], [0, 5, 6], [2]]
    assert plan_micro_batches(lengths, 2, 100) == [[4, 1], [3, 0], [5, 6], [2]]
    assert plan_micro_batches(lengths, 1) == [[4], [1], [3], [0], [5], [6], [2]]
    assert plan_micro_batches(lengths, 100, 19) == [[4], [1, 3], [0, 5, 6], [2]]
