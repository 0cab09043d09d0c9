"""The quickstart pipeline end to end on a reduced setting (2 TrOPD iterations, 8 held-out problems):
task data, HF -> Megatron at TP=2, evaluation, TrOPD on two processes with TensorBoard logs and a
checkpoint, evaluation, export to HF, and the summary line."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, SETUP="0", OUT=str(out), ITERS="2", EVAL_PROBLEMS="8",
               PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               # the python and torchrun of the environment running the tests
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "examples/quickstart_cpu.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"student_pass@1 before=\d\.\d{3} after=\d\.\d{3} teacher=\d\.\d{3}",
                        last), last
    assert "[quickstart" in result.stdout  # progress lines
    assert (out / "tropd" / "iter_0000002" / "megatron_tropd.json").is_file()
    assert any((out / "tropd" / "tensorboard").iterdir())
    exported = out / "student-tropd-hf"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(exported))
