"""Two "nodes" on 127.0.0.1: examples/distill.sh started twice with NNODES=2, distinct NODE_RANKs
and one c10d rendezvous endpoint (two torchrun agents of two processes each) runs 3 TrOPD
iterations at TP=2 DP=2, and logs the same per-iteration losses (read from its TensorBoard events)
as the same launcher on one node with four processes."""

import math
import os
import subprocess
import sys

import pytest
import toy_setup

from megatron_tropd.runtime.cli import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    toy_setup.make_toy(root)
    return root


def _launch(root, save, **env):
    """examples/distill.sh on the toy problem: TrOPD with online teacher prefixes, TP=2, fp32 local
    spec; returns the running process."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TP="2", BF16="0", TE="0",
               STUDENT=os.path.join(root, "student"), TEACHER=os.path.join(root, "teacher"),
               PROMPTS=os.path.join(root, "prompts.jsonl"), TRAIN_ITERS=str(ITERS), SAVE=save,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    # the toy's sizes; 2 prompts per DP rank x (2 samples + 1 prefix row) = 6 rows, micro-batch 3
    flags = toy_setup.train_args(root, "--micro-batch-size", "3", iters=ITERS)
    return subprocess.Popen(["bash", "examples/distill.sh", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=600):
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def _logged_losses(save):
    """train/loss per iteration from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(save, "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_two_nodes_match_one_node(toy, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    two = str(tmp_path / "two_nodes")
    nodes = [_launch(toy, two, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="2",
                     RDZV_ENDPOINT=endpoint, RDZV_ID="two-node-test") for rank in (0, 1)]
    outputs = _finish(nodes)
    assert any("DP=2, TP=2, PP=1" in out for out in outputs), outputs
    one = str(tmp_path / "one_node")
    _finish([_launch(toy, one, NPROC_PER_NODE="4")])

    expected = _logged_losses(one)
    got = _logged_losses(two)
    assert [step for step, _ in expected] == list(range(1, ITERS + 1))
    assert all(math.isfinite(loss) and loss != 0.0 for _, loss in expected), expected
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (_, g), (_, e) in zip(got, expected):
        assert abs(g - e) <= 1e-6 * abs(e), (got, expected)
    assert os.path.isfile(os.path.join(two, f"iter_{ITERS:07d}", "megatron_tropd.json"))
