"""One user-error type and one way of reporting it: every project error class is a `UserError`;
`errors.run_main` turns one into `error: <message>` and exit status 2 and lets any other exception
through; and every entry point and tool, given a bad input, prints exactly that one line and exits
2 (all of them started at once in one fixture, each reported as its own case)."""

import os
import subprocess
import sys

import pytest

from megatron_tropd import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "/nonexistent/megatron-tropd"
# command (after `python`) -> the start of the one error line it must print
BAD_INPUTS = {
    "train": (["-m", "megatron_tropd.train", "--train-iters", "1", "--lr", "1e-3"],
              "error: give exactly one of --student-load and --student-config"),
    "train-flag": (["-m", "megatron_tropd.train", "--train-iters", "x"],
                   "error: argument --train-iters: invalid int value: 'x' (see --help)"),
    "evaluate": (["-m", "megatron_tropd.evaluate", "--load", MISSING, "--data", MISSING],
                 f"error: model config not found: {MISSING}"),
    "splits": (["-m", "megatron_tropd.tasks.splits", "--output-dir", MISSING, "--min-digits", "3",
                "--max-digits", "2"], "error: digit range must satisfy 1 <= min_digits"),
    "compare_hf_megatron": (["tools/compare_hf_megatron.py", "--hf-dir", MISSING,
                             "--megatron-dir", MISSING],
                            f"error: {MISSING} is not a megatron-tropd checkpoint"),
    "convert_checkpoint": (["tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", MISSING,
                            "--output-dir", MISSING + "-out"],
                           f"error: model config not found: {MISSING}"),
    "generate_teacher_responses": (["tools/generate_teacher_responses.py", "--load", MISSING,
                                    "--prompts", MISSING, "--output", MISSING + ".jsonl"],
                                   f"error: {MISSING}: no such tokenizer file or directory"),
    "make_toy_models": (["tools/make_toy_models.py", "--task", "formats", "--student-stop", "1",
                         "2"], "error: --student-stop takes one value or one per student (3)"),
    "plan_memory": (["tools/plan_memory.py", "--student", "nosuch", "--teacher", "nosuch",
                     "--gpus", "8"], "error: unknown model config 'nosuch'"),
    "run_results": (["tools/run_results.py", "--seeds", "0"],
                    "error: --seeds must be at least 1"),
    "train_tokenizer": (["tools/train_tokenizer.py", "--output", MISSING + ".txt"],
                        "error: --output must name a .model file"),
}


@pytest.fixture(scope="module")
def bad_input_results():
    """{name: (exit status, stdout, stderr)}: every command started at once, then waited for."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in BAD_INPUTS.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = proc.returncode, out, err
    return results


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_every_tool_reports_bad_input_as_one_line_and_status_2(bad_input_results, name):
    status, _, stderr = bad_input_results[name]
    lines = stderr.splitlines()
    assert status == errors.EXIT_STATUS and len(lines) == 1, stderr
    assert lines[0].startswith(BAD_INPUTS[name][1]), stderr


def test_every_project_error_is_a_user_error():
    from megatron_tropd.arguments import ArgumentError
    from megatron_tropd.checkpoint import CheckpointError
    from megatron_tropd.checkpoint.parity import ParityError
    from megatron_tropd.memory_plan import PlanError
    from megatron_tropd.models.arch import ArchitectureError
    from megatron_tropd.records import DataError
    from megatron_tropd.rollout.generate import GenerationError
    from megatron_tropd.tasks.verifiers import VerifierError
    from megatron_tropd.tokenizer import TokenizerError

    for cls in (ArgumentError, PlanError, ArchitectureError, CheckpointError, ParityError,
                DataError, GenerationError, VerifierError, TokenizerError):
        assert issubclass(cls, errors.UserError), cls


def test_run_main_reports_user_errors_and_passes_bugs_through(capsys):
    def bad(what):
        raise errors.UserError(f"{what} is wrong")

    with pytest.raises(SystemExit) as exc:
        errors.run_main(bad, "the flag")
    assert exc.value.code == 2 and capsys.readouterr().err == "error: the flag is wrong\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.run_main(lambda: 1 / 0)
    assert errors.run_main(lambda x, y=0: x + y, 1, y=2) == 3
