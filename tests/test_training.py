"""The trainer end to end on a tiny problem: every method runs at TP=2; losses equal across TP/PP
layouts; loss and gradients invariant to micro-batches and DP; learning lowers the reverse KL;
resume is bit-exact and works at another layout. Spawns are grouped by layout."""

import dataclasses
import math
import os

import pytest
import torch
import toy_setup

from megatron_tropd.runtime.testing import merge_reports, run_checks, run_distributed

METHOD_RUNS = {
    "opd": ("opd",),
    "tropd": ("tropd",),
    "tropd_mask_deterministic": ("tropd", "--outlier-mode", "mask", "--trust-region", "deterministic"),
    "tropd_clip_kl_region": ("tropd", "--outlier-mode", "clip", "--trust-region", "kl"),
    "tropd_prefix_online": ("tropd", "--prefix-source", "online", "--prefix-anneal-steps", "4",
                            "--micro-batch-size", "3"),
    "eopd": ("eopd", "--ppo-clip", "0.2"),
    "reopold": ("reopold",),
    "reopold_2stage": ("reopold-2stage", "--reopold-stage2-step", "1"),
    "entropy_opd": ("entropy-opd",),
    "jsd": ("jsd",),
    "fkl": ("fkl",),
}


# the exactness runs: every method, each of tropd's variants, guided rows, REOPOLD's and
# Entropy-OPD's selections, and micro-batches by a token budget (rows of several lengths)
EXACT_RUNS = {name: spec for name, spec in METHOD_RUNS.items()}
EXACT_RUNS["tropd_token_budget"] = ("tropd", "--max-tokens-per-micro-batch", "40",
                                    "--rollout-batch-size", "3")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_setup.make_toy(str(tmp_path_factory.mktemp("toy")))


# --- inside spawned processes -------------------------------------------------------------------


def _layout_flags():
    """The spawn's TP/PP, so the trainer runs at the layout the test started."""
    from megatron.core import parallel_state as ps

    return ("--tensor-model-parallel-size", str(ps.get_tensor_model_parallel_world_size()),
            "--pipeline-model-parallel-size", str(ps.get_pipeline_model_parallel_world_size()))


def _args(root, *extra, iters=3, method="tropd"):
    from megatron_tropd import arguments

    return arguments.parse_args(toy_setup.train_args(root, *_layout_flags(), *extra, iters=iters,
                                                     method=method))


def _train(root, *extra, iters=3, method="tropd"):
    from megatron_tropd import train

    return train.train(_args(root, *extra, iters=iters, method=method))


def _losses(run):
    return [h["loss"] for h in run.history]


def _grads(run):
    from megatron_tropd.checkpoint import sharding

    return sharding.global_state_dict(run.student.model, run.student.arch.vocab_size, grads=True)


def _weights(run):
    from megatron_tropd.checkpoint import sharding

    return sharding.global_state_dict(run.student.model, run.student.arch.vocab_size)


def _every_method(root):
    """TP=2: each method for two iterations, plus SFT; finite losses, method metrics logged."""
    def make_check(name, method, flags):
        def check():
            run = _train(root, *flags, iters=2, method=method)
            for h in run.history:
                assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]), h
                if method == "tropd":
                    assert 0.0 <= h["trusted_fraction"] <= 1.0
                if "--prefix-source" in flags:
                    assert h["prefix_fraction"] > 0.0
        check.__name__ = name
        return check

    def sft():
        run = _train(root, "--mode", "sft", "--sft-data", os.path.join(root, "sft.jsonl"),
                     iters=2)
        assert all(math.isfinite(h["sft_loss"]) for h in run.history)

    checks = [make_check(name, spec[0], spec[1:]) for name, spec in METHOD_RUNS.items()] + [sft]
    return run_checks(checks)


def _layout_losses(root):
    return _losses(_train(root, iters=3))


# --- exactness: one iteration of every method against a float64 full-vocabulary reference -------


def _exact_iteration(root, method, flags):
    """One iteration (no gradient clipping: the stored gradients are the loss's): the rollout
    batch, every per-token loss in record order (last stage), the logged loss and this stage's
    gradients."""
    from megatron_tropd import batches

    captured = {"per_token": []}
    originals = (batches.rollouts, batches.micro_batches_of,
                 batches.DistillationBatches.per_token_loss)

    def rollouts(*args):
        captured["batch"], metrics = originals[0](*args)
        return captured["batch"], metrics

    def micro_batches_of(*args):
        captured["micro_batches"] = originals[1](*args)
        return captured["micro_batches"]

    def per_token_loss(*args):
        per_token, metrics = originals[2](*args)
        captured["per_token"].append(per_token.detach().double())
        return per_token, metrics

    batches.rollouts, batches.micro_batches_of, batches.DistillationBatches.per_token_loss = (
        rollouts, micro_batches_of, per_token_loss)
    try:
        run = _train(root, *flags, "--clip-grad", "0", iters=1, method=method)
    finally:
        (batches.rollouts, batches.micro_batches_of,
         batches.DistillationBatches.per_token_loss) = originals
    batch, per_token = captured["batch"], None
    if captured["per_token"]:
        order = torch.cat([mb.index for mb in captured["micro_batches"]])
        per_token = torch.zeros(len(batch.record), dtype=torch.float64)
        per_token[order] = torch.cat(captured["per_token"])
    return dict(batch=batch, per_token=per_token, loss=(_losses(run) or [None])[0], grads=_grads(run),
                micro_batches=len(captured["micro_batches"]))


def _exact_runs(root):
    return {name: _exact_iteration(root, spec[0], spec[1:]) for name, spec in EXACT_RUNS.items()}


def _reference_iteration(root, method, flags, batch):
    """The same iteration written directly: each row's student and teacher logits from its own
    forward at TP=1, float64 log-softmax over the full vocabulary, every loss input by plain
    torch; the loss is `losses.compute_loss` (checked against the papers' formulas in
    test_losses.py) averaged over the batch's tokens, its gradient by autograd."""
    from megatron_tropd import arguments, batches
    from megatron_tropd.checkpoint import checkpointer
    from megatron_tropd.checkpoint.sharding import global_state_dict
    from megatron_tropd.distill import losses
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
    from megatron_tropd.tokens import TokenRecord

    args = _args(root, *flags, iters=1, method=method)
    config = arguments.distill_config(args)
    needs = losses.needs(config)
    vocab = toy_setup.STUDENT.vocab_size
    student = build_model(toy_setup.STUDENT, "student")
    checkpointer.load_weights(os.path.join(root, "student"), student)
    teacher = build_model(toy_setup.TEACHER, "teacher")
    checkpointer.load_weights(os.path.join(root, "teacher"), teacher)

    def scored_log_probs(model, grad):
        rows = []
        with torch.set_grad_enabled(grad):
            for sequence, prompt in zip(batch.sequences, batch.prompt_lengths):
                rows.append(model(sequence[None], None, None)[0, prompt - 1:-1, :vocab])
        return torch.log_softmax(torch.cat(rows).double(), dim=-1)  # [N, V]

    r = batch.record
    lp_s, lp_t = scored_log_probs(student, True), scored_log_probs(teacher, False)
    ids = r.ids[:, None]
    x = TokenRecord(ids=r.ids, on_policy=r.on_policy, old_logprobs=r.old_logprobs.double(),
                    student_entropy=r.student_entropy.double(),
                    teacher_logprobs=lp_t.gather(1, ids)[:, 0],
                    teacher_entropy=-(lp_t.exp() * lp_t).sum(-1),
                    student_logprobs=lp_s.gather(1, ids)[:, 0])
    if needs.topk:
        x.teacher_topk_logprobs, topk_ids = lp_t.topk(args.teacher_topk, dim=-1)
        x.student_topk_logprobs = lp_s.gather(1, topk_ids)
    p, q = lp_s.exp(), lp_t.exp()
    if needs.jsd:
        beta = config.jsd_beta
        lm = torch.log(beta * q + (1 - beta) * p)
        x.jsd = beta * (q * (lp_t - lm)).sum(-1) + (1 - beta) * (p * (lp_s - lm)).sum(-1)
    if needs.reverse_kl:
        x.reverse_kl = (p * (lp_s - lp_t)).sum(-1).detach()
    if needs.uniform:
        x.uniform = uniform_from_keys(sampling_keys(
            args.seed + batches.TRUST_SEED_OFFSET, batch.record_sample_ids(),
            batch.record_positions()))
    if needs.selection:
        if method == "reopold-2stage":  # its exploration stage at step 0: rewards above the floor
            x.selected = x.on_policy & (x.teacher_logprobs - x.old_logprobs > config.clip_floor)
        else:  # the top fraction by the student's entropy
            fraction = (config.entropy_opd_fraction if method == "entropy-opd"
                        else config.reopold_fraction)
            kept = x.student_entropy[x.on_policy].sort(descending=True).values
            threshold = kept[math.ceil(fraction * len(kept)) - 1]
            x.selected = x.on_policy & (x.student_entropy >= threshold)
    per_token = losses.compute_loss(x, config).per_token
    # REOPOLD's objective is the mean over its selected tokens, the others' over every token
    loss = per_token.sum() / (x.selected.sum() if method.startswith("reopold") else len(per_token))
    loss.backward()
    return dict(per_token=per_token.detach(), loss=loss.item(),
                grads=global_state_dict(student, vocab, grads=True))


def _references(root, exact):
    return {name: _reference_iteration(root, spec[0], spec[1:], exact[name]["batch"])
            for name, spec in EXACT_RUNS.items()}


def _micro_batch_runs(root):
    """DP=1: one iteration of the same global batch of 8 rows in micro-batches of 8 and 2 rows,
    and by token budgets of one row (24 = --max-prompt-length + --max-new-tokens) and of the
    whole batch; with the number of micro-batches each made."""
    from megatron_tropd import batches

    out = {}
    for name, flags in (("8", ("--micro-batch-size", "8")), ("2", ("--micro-batch-size", "2")),
                        ("row_budget", ("--max-tokens-per-micro-batch", "24")),
                        ("batch_budget", ("--micro-batch-size", "8",
                                          "--max-tokens-per-micro-batch", "1000"))):
        counts = []
        original = batches.micro_batches_of

        def counting(*args):
            micro_batches = original(*args)
            counts.append(len(micro_batches))
            return micro_batches

        batches.micro_batches_of = counting
        try:
            run = _train(root, *flags, iters=1)
        finally:
            batches.micro_batches_of = original
        out[name] = (_losses(run), _grads(run), counts[0])
    return out


def _dp2_run(root):
    import torch.distributed as dist

    run = _train(root, "--micro-batch-size", "2", iters=1)
    rank = dist.get_rank()
    return (_losses(run), _grads(run), _online_teacher_responses(root, 2 * rank, 2 * rank + 2,
                                                                 2 * rank), _trust_draws(root),
            _rollout_pass_rates(root))


def even_length(response: str, answer: str) -> str:
    """A verifier whose outcome depends on the response alone (the toy student rarely solves a
    problem): `correct` for an even number of characters."""
    return "correct" if len(response) % 2 == 0 else "wrong"


def _heldout_evaluations(root):
    """Two iterations with --eval-data held-out prompts every iteration (this module's
    `even_length` verifier): the trainer's evaluations, and `evaluate.evaluate` run here on the
    student before training and on the final checkpoint, loaded afresh."""
    import tempfile

    from megatron_tropd.checkpoint.checkpointer import latest_checkpoint
    from megatron_tropd.data import load_prompts
    from megatron_tropd.evaluate import evaluate, load_for_eval

    save = tempfile.mkdtemp()
    run = _train(root, "--verifier", "test_training:even_length", "--eval-data",
                 os.path.join(root, "heldout.jsonl"), "--eval-interval", "1", "--save", save,
                 iters=2)

    def reference(directory):
        arch, model, tokenizer = load_for_eval(directory, os.path.join(root, "tok.model"))
        examples = load_prompts(os.path.join(root, "heldout.jsonl"), tokenizer, "plain", 16)
        return evaluate(model, tokenizer, examples, arch.vocab_size, 8, verifier=even_length)

    return run.eval_history, reference(os.path.join(root, "student")), reference(
        latest_checkpoint(save))


def _rollout_pass_rates(root):
    """Two iterations with --verifier (this module's `even_length`) and teacher-prefix rows:
    the logged pass rates, and this rank's (correct, checked) counted here from the rollout
    batches over the rows without a teacher prefix."""
    from megatron_tropd import batches
    from megatron_tropd.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(root, "tok.model"))
    generate, rollouts = batches.generate, []

    def recorded(*args, **kwargs):
        rollouts.append(generate(*args, **kwargs))
        return rollouts[-1]

    batches.generate = recorded
    try:
        run = _train(root, "--verifier", "test_training:even_length", "--prefix-source", "online",
                     iters=2)
    finally:
        batches.generate = generate
    counts = []
    for batch in rollouts:
        own = [r for r, p in zip(batch.responses(), batch.prefix_lengths) if p == 0]
        counts.append((sum(even_length(tokenizer.decode(r), "") == "correct" for r in own),
                       len(own)))
    return [h["pass_rate"] for h in run.history], counts


def _learning(root, method):
    """Mean full-vocabulary KL(student || teacher) on held-out prompts, before and after 30
    iterations."""
    from megatron_tropd import run_setup

    flags = ("--lr", "1e-2", "--prompts-per-iteration", "8", "--samples-per-prompt", "4",
             "--micro-batch-size", "16")
    before = _heldout_reverse_kl(run_setup.setup_run(_args(root, *flags, iters=30, method=method)),
                                 root)
    after = _heldout_reverse_kl(_train(root, *flags, iters=30, method=method), root)
    return before, after


def _heldout_reverse_kl(run, root):
    from megatron_tropd.data import load_prompts
    from megatron_tropd.ops import vocab_parallel as vp
    from megatron_tropd.rollout.generate import SamplingParams, generate
    from megatron_tropd.tokenizer import load_tokenizer

    prompts = load_prompts(os.path.join(root, "heldout.jsonl"),
                           load_tokenizer(os.path.join(root, "tok.model")), "plain")
    source = run.batches
    batch = generate(source.student, [p.prompt_ids for p in prompts],
                     SamplingParams(max_new_tokens=8, n_samples=4, seed=123,
                                    stop_ids=source.stop_ids), source.vocab_size)
    kls = []
    with torch.no_grad():
        for sequence, prompt in zip(batch.sequences, batch.prompt_lengths):
            student = source.student(sequence[None], None, None)[0, prompt - 1:-1]
            teacher = source.teacher(sequence[None], None, None)[0, prompt - 1:-1]
            kls.append(vp.kl_divergence(student, teacher, source.vocab_size))
    return torch.cat(kls).mean().item()


def _online_teacher_responses(root, first, last, offset):
    """Online teacher responses of prompts `first..last-1` keyed at global index `offset`, from a
    randomly initialised teacher (the toy teacher is too peaked for its samples to show their
    keys)."""
    import json

    from megatron_tropd import run_setup
    from megatron_tropd.runtime.initialize import set_seed

    config = os.path.join(root, "random_teacher.json")
    if not os.path.exists(config):
        with open(config + f".{os.getpid()}", "w") as f:
            json.dump(dataclasses.asdict(toy_setup.TEACHER), f)
        os.replace(config + f".{os.getpid()}", config)
    set_seed(5)  # the same random weights whatever this process ran before
    run = run_setup.setup_run(_args(root, "--prefix-source", "online", "--teacher-load", "",
                                    "--teacher-config", config, iters=1))
    prompts = [run.batches.prompts[i].prompt_ids for i in range(first, last)]
    return run.batches.teacher_responses(prompts, offset)


def _trust_draws(root):
    """One tropd iteration on four prompts of different lengths (so the data-parallel ranks'
    longest contexts differ): the trust test's uniform of every on-policy token of this rank, by
    (sample id, position in the response)."""
    import json

    from megatron_tropd import batches

    path = os.path.join(root, "uneven_prompts.jsonl")
    if not os.path.exists(path):
        with open(path + f".{os.getpid()}", "w") as f:
            for q in ("Q:1+2=", "Q:12+34=", "Q:12+345=", "Q:9+9+99+8="):
                f.write(json.dumps({"prompt": q}) + "\n")
        os.replace(path + f".{os.getpid()}", path)
    draws, original = {}, batches.distill_fields

    def distill_fields(source, batch, step):
        metrics = original(source, batch, step)
        keys = zip(batch.record_sample_ids().tolist(), batch.record_positions().tolist())
        draws.update({k: u for k, u in zip(keys, batch.record.uniform.tolist())})
        return metrics

    batches.distill_fields = distill_fields
    try:
        _train(root, "--prompts", path, "--micro-batch-size", "2", iters=1)
    finally:
        batches.distill_fields = original
    return draws


def _offline_guidance(root):
    """One tropd iteration guided by a --teacher-responses file made here (a response of 4-6 ids
    per prompt): the rows `generate` was given as (prompt, prefix) pairs, and the file's
    responses by prompt."""
    import json

    from megatron_tropd import batches
    from megatron_tropd.data import load_prompts
    from megatron_tropd.tokenizer import load_tokenizer

    prompts = load_prompts(os.path.join(root, "prompts.jsonl"),
                           load_tokenizer(os.path.join(root, "tok.model")), "plain", 16)
    responses = {tuple(p.prompt_ids): tuple(3 + (i + k) % 20 for k in range(4 + i % 3))
                 for i, p in enumerate(prompts)}
    path = os.path.join(root, f"teacher_responses.{os.getpid()}.jsonl")
    with open(path, "w") as f:
        for prompt, response in responses.items():
            f.write(json.dumps({"prompt_ids": list(prompt), "response_ids": list(response)}) + "\n")
    generate, rows = batches.generate, []

    def recorded(model, row_prompts, *args, prefixes=None, **kwargs):
        rows.extend((tuple(p), tuple(x)) for p, x in zip(row_prompts, prefixes))
        return generate(model, row_prompts, *args, prefixes=prefixes, **kwargs)

    batches.generate = recorded
    try:
        _train(root, "--prefix-source", "offline", "--teacher-responses", path, iters=1)
    finally:
        batches.generate = generate
    return rows, responses


def _bf16_first_ratios(root):
    """The first epoch's mean importance ratio of a bf16 run (on this CPU, validation's GPU
    requirement for --bf16 lifted), with lp_S_old recomputed (the default with --bf16) and as
    sampled."""
    from megatron_tropd import arguments

    original = arguments._cuda_available
    arguments._cuda_available = lambda: True
    try:
        return {flag: _train(root, "--bf16", "--recompute-old-logprobs", flag,
                             iters=1).history[0]["ratio"] for flag in ("auto", "off")}
    finally:
        arguments._cuda_available = original


def _tp1_worker(root):
    exact = _exact_runs(root)
    return dict(layout=_layout_losses(root), micro=_micro_batch_runs(root),
                learning={m: _learning(root, m) for m in ("opd", "tropd")},
                exact=exact, references=_references(root, exact),
                teacher_responses={offset: _online_teacher_responses(root, 0, 4, offset)
                                   for offset in (0, 4)},
                trust_draws=_trust_draws(root), bf16_ratios=_bf16_first_ratios(root),
                offline_guidance=_offline_guidance(root),
                evaluations=_heldout_evaluations(root))


def _tp2_worker(root, resume_dir):
    """Methods, layout losses and the resume test at TP=2."""
    full_dir, split_dir = os.path.join(resume_dir, "full"), os.path.join(resume_dir, "split")
    schedule = ("--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--min-lr", "1e-4")
    full = _train(root, *schedule, "--save", full_dir, "--save-interval", "3", iters=6)
    first = _train(root, *schedule, "--save", split_dir, "--exit-interval", "3", iters=6)
    second = _train(root, *schedule, "--save", split_dir, iters=6)
    return dict(methods=_every_method(root), layout=_layout_losses(root), exact=_exact_runs(root),
                resume=dict(full=(_losses(full), _weights(full)),
                            split=(_losses(first) + _losses(second), _weights(second),
                                   second.state.iteration)))


def _pp2_worker(root, resume_dir):
    """Layout losses at PP=2, and resuming the TP=2 checkpoint at PP=2."""
    resharded = _train(root, "--load", os.path.join(resume_dir, "split"),
                       "--save", os.path.join(resume_dir, "pp2"), iters=7)
    return dict(layout=_layout_losses(root), resharded=_losses(resharded),
                exact=_exact_runs(root))


def _tp2pp2_worker(root):
    return dict(layout=_layout_losses(root), exact=_exact_runs(root))


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def tp1(toy):
    return run_distributed(_tp1_worker, world_size=1, args=(toy,))[-1]


@pytest.fixture(scope="module")
def tp2(toy, resume_dir):
    return run_distributed(_tp2_worker, world_size=2, tp=2, args=(toy, resume_dir))


@pytest.fixture(scope="module")
def pp2(toy, resume_dir, tp2):
    return run_distributed(_pp2_worker, world_size=2, pp=2, args=(toy, resume_dir))


@pytest.mark.parametrize("name", list(METHOD_RUNS) + ["sft"])
def test_method_runs_end_to_end_at_tp2(tp2, name):
    error = merge_reports([r["methods"] for r in tp2])[name]
    assert error is None, error


def _assert_losses_close(got, expected):
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert abs(g - e) <= 1e-4 * max(1.0, abs(e)), (got, expected)


def test_tp2_losses_equal_tp1(tp1, tp2):
    _assert_losses_close(tp2[-1]["layout"], tp1["layout"])


def test_pp2_losses_equal_tp1(tp1, pp2):
    _assert_losses_close(pp2[-1]["layout"], tp1["layout"])


@pytest.fixture(scope="module")
def tp2pp2(toy):
    return run_distributed(_tp2pp2_worker, world_size=4, tp=2, pp=2, args=(toy,))


def test_tp2pp2_losses_equal_tp1(tp1, tp2pp2):
    _assert_losses_close(tp2pp2[-1]["layout"], tp1["layout"])


def _exact_layouts(tp1, tp2, pp2, tp2pp2):
    return {"tp1": [tp1], "tp2": tp2, "pp2": pp2, "tp2pp2": tp2pp2}


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2pp2"])
@pytest.mark.parametrize("name", list(EXACT_RUNS))
def test_per_token_losses_and_gradients_equal_reference(tp1, tp2, pp2, tp2pp2, layout, name):
    """The trainer's per-token losses, loss and gradients (every pipeline stage's, gathered over
    TP) equal the float64 full-vocabulary reference on the same rollout, within 1e-5 of their
    largest magnitude."""
    ranks = [r["exact"][name] for r in _exact_layouts(tp1, tp2, pp2, tp2pp2)[layout]]
    reference = tp1["references"][name]
    ours = ranks[-1]
    expected_rows = [s.tolist() for s in tp1["exact"][name]["batch"].sequences]
    assert [s.tolist() for s in ours["batch"].sequences] == expected_rows  # the same rollout
    _assert_close(ours["per_token"], reference["per_token"], "per-token loss")
    assert abs(ours["loss"] - reference["loss"]) <= 1e-5 * max(1.0, abs(reference["loss"]))
    grads = {}
    for r in ranks:
        grads.update(r["grads"])
    assert set(grads) == set(reference["grads"])
    for param, expected in reference["grads"].items():
        _assert_close(grads[param], expected, param)


def _assert_close(got, expected, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is zero"
    diff = (got.double() - expected.double()).abs().max().item()
    assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff:.3g} > 1e-5 x {scale:.3g}"


def _assert_grads_close(got, expected):
    assert set(got) == set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (got[name] - g).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("split,count", [("2", 4), ("row_budget", 8), ("batch_budget", 1)])
def test_micro_batches_do_not_change_loss_or_gradients(tp1, split, count):
    loss8, grads8, _ = tp1["micro"]["8"]
    loss, grads, micro_batches = tp1["micro"][split]
    assert micro_batches == count
    assert abs(loss8[0] - loss[0]) <= 1e-6 * max(1.0, abs(loss8[0]))
    _assert_grads_close(grads, grads8)


@pytest.fixture(scope="module")
def dp2(toy):
    return run_distributed(_dp2_run, world_size=2, args=(toy,))


def test_online_teacher_responses_are_keyed_by_global_prompt(tp1, dp2):
    """The teacher's online responses are keyed by the global prompt index: the same prompts
    drawn at another position (a later iteration) get other responses, and two data-parallel
    ranks together give what one rank gives for the same global prompts."""
    responses = tp1["teacher_responses"]
    assert all(r != s for r, s in zip(responses[0], responses[4]))
    assert dp2[0][2] + dp2[1][2] == responses[0]


def test_offline_guidance_continues_the_files_responses(tp1):
    """--prefix-source offline: each prompt's one teacher-prefix row starts with the file's
    response to that prompt, whole at step 0 (alpha = 1); the student's own rows have none."""
    rows, responses = tp1["offline_guidance"]
    assert len(rows) == 4 * 3  # 4 prompts x (2 samples + 1 prefix row)
    guided = [(prompt, prefix) for prompt, prefix in rows if prefix]
    assert len(guided) == 4
    assert all(prefix == responses[prompt] for prompt, prefix in guided)


def test_bf16_recomputed_old_logprobs_make_the_first_ratio_exactly_one(tp1):
    """In bf16 the sampler's lp_S_old (the decode path) differs from the training forward's
    lp_S, so the first ratio is not 1; recomputed by the training model it is exactly 1."""
    ratios = tp1["bf16_ratios"]
    assert ratios["auto"] == 1.0
    assert ratios["off"] != 1.0 and abs(ratios["off"] - 1.0) < 0.05


def test_heldout_evaluation_during_training(tp1):
    """--eval-data/--eval-interval: greedy held-out figures before the first iteration and after
    each, those at the start and the end equal to evaluating the initial student and the final
    checkpoint on their own."""
    history, before, after = tp1["evaluations"]
    assert [h["iteration"] for h in history] == [0, 1, 2]
    for logged, expected in ((history[0], before), (history[-1], after)):
        assert {k: logged[k] for k in ("problems", "pass@1", "greedy", "mean_length")} == {
            k: expected[k] for k in ("problems", "pass@1", "greedy", "mean_length")}


def test_rollout_pass_rate_is_logged_over_the_global_batch(dp2):
    """--verifier logs, each iteration, the fraction of the student's own rollouts (teacher-prefix
    rows left out) the verifier passes, over both data-parallel ranks."""
    logged = dp2[1][4][0]  # the last rank logs
    counts = [rank[4][1] for rank in dp2]
    for iteration, rate in enumerate(logged):
        correct = sum(rank[iteration][0] for rank in counts)
        checked = sum(rank[iteration][1] for rank in counts)
        assert checked == 2 * 4 and rate == pytest.approx(correct / checked)
    assert len(logged) == 2


def test_trust_draws_do_not_depend_on_the_data_parallel_size(tp1, dp2):
    """Each token's trust-test uniform is keyed by (sample id, position in the response): DP=1
    and DP=2 give every token the same draw, although the ranks' contexts differ in length (the
    former column keys moved with the longest context on the rank)."""
    whole = tp1["trust_draws"]
    split = {**dp2[0][3], **dp2[1][3]}
    assert len(whole) > 20 and split == whole


def test_data_parallel_does_not_change_loss_or_gradients(tp1, dp2):
    ranks = dp2
    loss, grads = ranks[-1][:2]
    loss8, grads8, _ = tp1["micro"]["8"]
    assert abs(loss[0] - loss8[0]) <= 1e-6 * max(1.0, abs(loss8[0]))
    _assert_grads_close(grads, grads8)
    _assert_grads_close(ranks[0][1], grads8)  # both replicas hold the same reduced gradient


@pytest.mark.parametrize("method", ["opd", "tropd"])
def test_distillation_lowers_heldout_reverse_kl(tp1, method):
    before, after = tp1["learning"][method]
    assert after < 0.6 * before, (before, after)


def test_resume_is_bit_exact_at_tp2(tp2):
    full_losses, full_weights = tp2[-1]["resume"]["full"]
    split_losses, split_weights, iteration = tp2[-1]["resume"]["split"]
    assert iteration == 6 and len(full_losses) == len(split_losses) == 6
    assert split_losses == full_losses
    assert set(split_weights) == set(full_weights)
    for name, w in full_weights.items():
        assert torch.equal(split_weights[name], w), name


def test_resume_at_another_layout_continues(pp2):
    assert len(pp2[-1]["resharded"]) == 1 and math.isfinite(pp2[-1]["resharded"][0])


def _export_and_logits(directory, hf_dir, tokens):
    """Export a trainer checkpoint to HF, and its logits rebuilt from its own config at TP=1."""
    from megatron_tropd.checkpoint.conversion import megatron_to_hf
    from megatron_tropd.checkpoint.model_dir import load_model
    from megatron_tropd.checkpoint.parity import forward_logits
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model

    megatron_to_hf(directory, hf_dir)
    arch = ModelArch.from_file(directory)
    model = build_model(arch, "teacher")
    load_model(directory, model)
    return forward_logits(model, tokens, arch.vocab_size)


def test_trainer_checkpoint_exports_to_hf(tp2, resume_dir, tmp_path):
    """The student saved by the trainer (TP=2) converts to HF; transformers gives its logits."""
    from megatron_tropd.checkpoint.parity import hf_logits, logit_parity

    checkpoint = os.path.join(resume_dir, "full", "iter_0000006")
    hf_dir = str(tmp_path / "hf")
    tokens = torch.randint(0, toy_setup.STUDENT.vocab_size, (2, 12),
                           generator=torch.Generator().manual_seed(0))
    ours = run_distributed(_export_and_logits, world_size=1, args=(checkpoint, hf_dir, tokens))[0]
    parity = logit_parity(hf_logits(hf_dir, tokens), ours)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["kl"] <= 1e-8, parity


def test_nonfinite_gradient_check():
    """The update's one-pass check finds NaN, +inf and -inf anywhere in a gradient buffer."""
    from megatron_tropd.train import _all_finite_values

    grads = torch.randn(1000)
    assert _all_finite_values(grads) and _all_finite_values(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 517, 999):
            broken = grads.clone()
            broken[where] = bad
            assert not _all_finite_values(broken), (bad, where)
