"""The trainer end to end on a tiny problem: every method runs at TP=2; losses equal across TP/PP
layouts; loss and gradients invariant to micro-batches and DP; learning lowers the reverse KL;
resume is bit-exact and works at another layout. Spawns are grouped by layout."""

import math
import os
import shutil

import pytest
import torch

import toy_setup
from megatron_tropd.testing import merge_reports, run_checks, run_distributed

METHOD_RUNS = {
    "opd": ("opd",),
    "tropd": ("tropd",),
    "tropd_mask_deterministic": ("tropd", "--outlier-mode", "mask", "--trust-region", "deterministic"),
    "tropd_clip_kl_region": ("tropd", "--outlier-mode", "clip", "--trust-region", "kl"),
    "tropd_prefix_online": ("tropd", "--prefix-source", "online", "--prefix-anneal-steps", "4",
                            "--micro-batch-size", "3"),
    "eopd": ("eopd", "--ppo-clip", "0.2"),
    "reopold": ("reopold", "--reopold-stage2-step", "1"),
    "entropy_opd": ("entropy-opd",),
    "jsd": ("jsd",),
    "fkl": ("fkl",),
}


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
    from megatron_tropd import training

    return training.train(_args(root, *extra, iters=iters, method=method))


def _losses(run):
    return [h["loss"] for h in run.history]


def _grads(run):
    from megatron_tropd.models import sharding

    return sharding.global_state_dict(run.model, run.vocab_size, grads=True)


def _weights(run):
    from megatron_tropd.models import sharding

    return sharding.global_state_dict(run.model, run.vocab_size)


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


def _micro_batch_runs(root):
    """DP=1: one iteration with 1 and with 4 micro-batches (same global batch)."""
    out = {}
    for mbs in ("8", "2"):
        run = _train(root, "--micro-batch-size", mbs, iters=1)
        out[mbs] = (_losses(run), _grads(run))
    return out


def _dp2_run(root):
    run = _train(root, "--micro-batch-size", "2", iters=1)
    return _losses(run), _grads(run)


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
    batch = generate(run.model, [p.prompt_ids for p in prompts],
                     SamplingParams(max_new_tokens=8, n_samples=4, seed=123, stop_ids=run.stop_ids),
                     run.vocab_size, pad_id=run.pad_id)
    mask = batch.student_mask[:, 1:]
    with torch.no_grad():
        student = run.model(batch.tokens, None, batch.attention_mask())[:, :-1][mask]
        teacher = run.teacher(batch.tokens, None, batch.attention_mask())[:, :-1][mask]
    return vp.kl_divergence(student, teacher, run.vocab_size).mean().item()


def _tp1_worker(root):
    return dict(layout=_layout_losses(root), micro=_micro_batch_runs(root),
                learning={m: _learning(root, m) for m in ("opd", "tropd")})


def _tp2_worker(root, resume_dir):
    """Methods, layout losses and the resume test at TP=2."""
    full_dir, split_dir = os.path.join(resume_dir, "full"), os.path.join(resume_dir, "split")
    schedule = ("--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--min-lr", "1e-4")
    full = _train(root, *schedule, "--save", full_dir, "--save-interval", "3", iters=6)
    first = _train(root, *schedule, "--save", split_dir, "--exit-interval", "3", iters=6)
    second = _train(root, *schedule, "--save", split_dir, iters=6)
    return dict(methods=_every_method(root), layout=_layout_losses(root),
                resume=dict(full=(_losses(full), _weights(full)),
                            split=(_losses(first) + _losses(second), _weights(second),
                                   second.iteration)))


def _pp2_worker(root, resume_dir):
    """Layout losses at PP=2, and resuming the TP=2 checkpoint at PP=2."""
    resharded = _train(root, "--load", os.path.join(resume_dir, "split"),
                       "--save", os.path.join(resume_dir, "pp2"), iters=7)
    return dict(layout=_layout_losses(root), resharded=_losses(resharded))


def _tp2pp2_worker(root):
    return _layout_losses(root)


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
    return run_distributed(_pp2_worker, world_size=2, pp=2, args=(toy, resume_dir))[-1]


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
    _assert_losses_close(pp2["layout"], tp1["layout"])


def test_tp2pp2_losses_equal_tp1(toy, tp1):
    _assert_losses_close(run_distributed(_tp2pp2_worker, world_size=4, tp=2, pp=2, args=(toy,))[-1],
                         tp1["layout"])


def _assert_grads_close(got, expected):
    assert set(got) == set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (got[name] - g).abs().max().item() <= 1e-5 * scale, name


def test_micro_batches_do_not_change_loss_or_gradients(tp1):
    (loss8, grads8), (loss2, grads2) = tp1["micro"]["8"], tp1["micro"]["2"]
    assert abs(loss8[0] - loss2[0]) <= 1e-6 * max(1.0, abs(loss8[0]))
    _assert_grads_close(grads2, grads8)


def test_data_parallel_does_not_change_loss_or_gradients(toy, tp1):
    ranks = run_distributed(_dp2_run, world_size=2, args=(toy,))
    loss, grads = ranks[-1]
    loss8, grads8 = tp1["micro"]["8"]
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
    assert len(pp2["resharded"]) == 1 and math.isfinite(pp2["resharded"][0])


def _export_and_logits(directory, hf_dir, tokens):
    """Export a trainer checkpoint to HF, and its logits rebuilt from its own config at TP=1."""
    from megatron_tropd.conversion import megatron_to_hf
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.models.checkpoint import load_model
    from megatron_tropd.models.parity import forward_logits

    megatron_to_hf(directory, hf_dir)
    arch = ModelArch.from_file(directory)
    model = build_model(arch, "teacher")
    load_model(directory, model)
    return forward_logits(model, tokens, arch.vocab_size)


def test_trainer_checkpoint_exports_to_hf(tp2, resume_dir, tmp_path):
    """The student saved by the trainer (TP=2) converts to HF; transformers gives its logits."""
    from megatron_tropd.models.parity import hf_logits, logit_parity

    checkpoint = os.path.join(resume_dir, "full", "iter_0000006")
    hf_dir = str(tmp_path / "hf")
    tokens = torch.randint(0, toy_setup.STUDENT.vocab_size, (2, 12),
                           generator=torch.Generator().manual_seed(0))
    ours = run_distributed(_export_and_logits, world_size=1, args=(checkpoint, hf_dir, tokens))[0]
    parity = logit_parity(hf_logits(hf_dir, tokens), ours)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["kl"] <= 1e-8, parity


def test_nonfinite_gradient_check():
    """The update's one-pass check finds NaN, +inf and -inf anywhere in a gradient buffer."""
    from megatron_tropd.training import _all_finite_values

    grads = torch.randn(1000)
    assert _all_finite_values(grads) and _all_finite_values(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 517, 999):
            broken = grads.clone()
            broken[where] = bad
            assert not _all_finite_values(broken), (bad, where)
