"""The CUDA path (NCCL, one GPU), checked against the CPU path and transformers on the same machine.

Collected only where CUDA is available (tests/conftest.py); CI has no GPU. Run on a GPU host:

    python -m pytest tests/gpu -q

Each check compares a CUDA result with an independent one: HF transformers' logits (fp32, bf16),
the CPU path's greedy pass@1 and training losses (spawned with CUDA hidden), and the rollout
reference checks of tests/test_rollout.py (KV cache == recompute, lp_S_old == training forward,
teacher signals == a float64 full-vocabulary computation) run on the GPU.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

import test_rollout  # noqa: E402
import toy_setup  # noqa: E402

from megatron_tropd.runtime.testing import run_distributed  # noqa: E402

TOY = os.path.join(ROOT, "examples", "toy")


def _run(*args, cpu=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The embedded toy models as Megatron checkpoints, and held-out problems."""
    root = str(tmp_path_factory.mktemp("toy"))
    for name in ("teacher", "student"):
        _run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir",
             os.path.join(TOY, name), "--output-dir", os.path.join(root, name))
    _run("-m", "megatron_tropd.tasks.splits", "--output-dir", os.path.join(root, "data"),
         "--train", "100", "--heldout", "200")
    return root


# bf16: the two implementations round differently (max |dlogit| 2.4 seen), so judge by KL/top-1
@pytest.mark.parametrize("dtype,max_diff,max_kl", [("float32", 1e-3, 1e-8),
                                                   ("bfloat16", 5.0, 2e-2)])
def test_logits_match_transformers_on_cuda(toy, dtype, max_diff, max_kl):
    last = _run("tools/compare_hf_megatron.py", "--hf-dir", os.path.join(TOY, "teacher"),
                "--megatron-dir", os.path.join(toy, "teacher"), "--dtype", dtype,
                "--batch-size", "4", "--seq-length", "96").strip().splitlines()[-1]
    parity = dict(kv.split("=") for kv in last.split())
    print(dtype, last)
    assert float(parity["max_abs_logit_diff"]) <= max_diff, last
    assert float(parity["kl"]) <= max_kl, last
    assert float(parity["top1_agree"]) >= 0.97, last


def test_greedy_pass_at_1_equals_cpu(toy):
    results = {}
    for device, cpu in (("cuda", False), ("cpu", True)):
        output = os.path.join(toy, f"eval_{device}.json")
        _run("-m", "megatron_tropd.evaluate", "--load", os.path.join(toy, "student"),
             os.path.join(toy, "teacher"), "--label", "student", "teacher", "--data",
             os.path.join(toy, "data", "heldout.jsonl"), "--output", output, cpu=cpu)
        with open(output) as f:
            results[device] = json.load(f)
    print({d: {m: r["pass@1"] for m, r in res.items()} for d, res in results.items()})
    for model in ("student", "teacher"):  # 200 problems: at most one near-tie may flip
        assert abs(results["cuda"][model]["pass@1"] - results["cpu"][model]["pass@1"]) <= 0.005
    assert results["cuda"]["teacher"]["pass@1"] >= 0.98


def _train_losses(root, *extra):
    from megatron_tropd import arguments, train

    run = train.train(arguments.parse_args(toy_setup.train_args(root, *extra, iters=3)))
    return [h["loss"] for h in run.history], str(next(run.student.model.parameters()).device)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    toy_setup.make_text_files(root)
    run_distributed(toy_setup.make_checkpoints, world_size=1, args=(root,))
    return root


def test_training_losses_equal_cpu_and_bf16_distributed_optimizer_is_close(tiny, monkeypatch):
    fp32, device = run_distributed(_train_losses, world_size=1, args=(tiny,))[0]
    bf16, _ = run_distributed(_train_losses, world_size=1,
                              args=(tiny, "--bf16", "--use-distributed-optimizer"))[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu, cpu_device = run_distributed(_train_losses, world_size=1, args=(tiny,))[0]
    print("cuda fp32", fp32, "bf16", bf16, "cpu", cpu)
    assert device.startswith("cuda") and cpu_device == "cpu"
    for a, b in zip(fp32, cpu):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (fp32, cpu)
    assert all(math.isfinite(x) for x in bf16)
    assert abs(bf16[0] - fp32[0]) <= 0.05 * max(1.0, abs(fp32[0])), (bf16, fp32)


def test_rollout_reference_checks_on_cuda(tmp_path):
    report, _ = run_distributed(test_rollout._reference_run, world_size=1,
                                args=(str(tmp_path),))[0]
    failures = {name: error for name, error in report.items() if error is not None}
    assert not failures, "\n".join(f"{n}:\n{e}" for n, e in failures.items())
