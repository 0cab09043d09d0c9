"""The quickstart pipeline end to end on a reduced setting (2 TrOPD iterations, 8 held-out problems):
task data, HF -> Megatron at TP=2, evaluation, TrOPD on two processes with TensorBoard logs and a
checkpoint, evaluation, export to HF, and the summary line; its stderr holds none of the warnings
megatron_tropd.runtime.console filters, which TROPD_VERBOSE=1 and --verbose show."""

import os
import re
import subprocess
import sys

from megatron_tropd.runtime import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTERED = [re.compile(row.message, re.I) for row in console.FILTERED]

# The modules the entry points import before parsing, then megatron-core modules that warn at
# import (Apex, Transformer Engine fallbacks) and megatron-core's default cuda_graph_scope.
_WARNING_SCRIPT = """
import sys
import megatron_tropd.data, megatron_tropd.evaluate, megatron_tropd.rollout.generate
import megatron_tropd.tokenizer, megatron_tropd.train
print("--- entry points imported", file=sys.stderr, flush=True)
import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer
from megatron.core.transformer import TransformerConfig
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
"""
_SHOWN = ("Apex is not installed", "Transformer Engine and Apex are not installed",
          "full scope is deprecated")


def _env(**extra):
    """This checkout, one thread, the python and torchrun of the environment running the tests;
    TROPD_VERBOSE only where `extra` sets it."""
    env = {name: value for name, value in os.environ.items() if name != console.ENV}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **extra)
    return env


def filtered_lines(stderr: str) -> list:
    """The lines of `stderr` that hold a message of console.FILTERED."""
    return [line for line in stderr.splitlines() if any(p.search(line) for p in FILTERED)]


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = _env(SETUP="0", OUT=str(out), ITERS="2", EVAL_PROBLEMS="8")
    result = subprocess.run(["bash", "examples/quickstart_cpu.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"student_pass@1 before=\d\.\d{3} after=\d\.\d{3} teacher=\d\.\d{3}",
                        last), last
    assert "[quickstart" in result.stdout  # progress lines
    assert not filtered_lines(result.stderr), result.stderr[-3000:]
    assert (out / "tropd" / "iter_0000002" / "megatron_tropd.json").is_file()
    assert any((out / "tropd" / "tensorboard").iterdir())
    exported = out / "student-tropd-hf"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(exported))


def test_verbose_shows_the_filtered_warnings(tmp_path):
    def stderr(command, **extra):
        result = subprocess.run(command, cwd=ROOT, env=_env(**extra), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    script = [sys.executable, "-c", _WARNING_SCRIPT]
    assert not filtered_lines(stderr(script))
    verbose = stderr(script, **{console.ENV: "1"})
    before_parsing, _, after = verbose.partition("--- entry points imported")
    assert not filtered_lines(before_parsing)  # so --verbose, read after parsing, is in time
    assert all(message in after for message in _SHOWN), verbose
    # --verbose of an entry point (one process, the toy student at TP=1)
    converted = stderr([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron",
                        "--hf-dir", "examples/toy/student", "--output-dir", str(tmp_path / "ckpt"),
                        "--verbose"])
    assert all(message in converted for message in _SHOWN), converted
