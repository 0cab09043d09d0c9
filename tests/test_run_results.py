"""tools/run_results.py and tools/results_report.py: the grid it runs, the statistics it reports
(against hand-computed values), that a stopped grid skips its complete runs and restarts a begun
one from scratch, that the doc's hand-written text survives a rewrite, and end to end on the
addition toy models: a second start re-runs nothing and `--rerun` reproduces a finished run's
numbers exactly."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/ imports as a package from the repo root, as run_results.py does

from tools import run_results as rr  # noqa: E402
from tools.results_report import (BEGIN, END, collapsed, mean_ci, plateau_iteration,  # noqa: E402
                                  write_doc)


def test_grid_holds_every_part_once():
    runs = rr.grid(rr.parse_args([]))
    names = [run.name for run in runs]
    assert len(names) == len(set(names))
    by_part = {part: [r for r in runs if r.part == part]
               for part in ("main", "mismatch", "lr", "addition")}
    trained = len(rr.METHODS) - 1
    assert len(by_part["main"]) == 1 + trained * 5  # the student once, every method x 5 seeds
    assert {r.student for r in by_part["main"]} == {"matched"}
    # two mismatched students x (the student once + OPD, full TrOPD, JSD x 3 seeds)
    assert len(by_part["mismatch"]) == 2 * (1 + 3 * 3)
    assert {r.student for r in by_part["mismatch"]} == {"partial", "mismatched"}
    # the main lr is in the main table; the sweep adds the two others for OPD and full TrOPD
    assert sorted({(r.method, r.lr) for r in by_part["lr"]}) == [
        (m, lr) for m in sorted(rr.LR_METHODS) for lr in (1e-4, 1e-3)]
    assert len(by_part["lr"]) == 2 * 2 * 3
    assert len(by_part["addition"]) == 1 + trained * 3


def test_statistics_against_hand_computed_values():
    mean, half = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # t(0.975, 2 dof) * s / sqrt(n)
    assert mean_ci([0.4]) == (0.4, 0.0)
    run = {"evals": [[0, 0.2], [10, 0.05]], "final_pass@1": 0.05}
    assert collapsed(run) and not collapsed({**run, "final_pass@1": 0.1})
    assert plateau_iteration([(0, 0.1), (25, 0.5), (50, 0.69), (75, 0.70), (100, 0.6)]) == 50


class _Execute:
    """A stand-in for Grid.execute: records its calls; fails when told to."""

    def __init__(self):
        self.calls, self.fail = [], False

    def __call__(self, run, run_dir):
        self.calls.append((run.name, os.listdir(run_dir)))
        if self.fail:
            raise rr.RunError("a failed run")
        return {"name": run.name, "final_pass@1": 0.5, "seconds": 1.0, "cpu_seconds": 1.0}


def test_complete_runs_are_skipped_and_begun_ones_restarted(tmp_path):
    grid = rr.Grid(rr.parse_args(["--output-dir", str(tmp_path)]))
    grid.execute = execute = _Execute()
    done, begun, failing = rr.grid(grid.args)[1:4]
    assert grid.result(done)["name"] == done.name
    assert grid.result(done)["final_pass@1"] == 0.5
    assert [name for name, _ in execute.calls] == [done.name]  # the second call read the file
    # a run that was stopped midway: its partial files are removed before it runs again
    os.makedirs(grid.run_dir(begun))
    open(os.path.join(grid.run_dir(begun), "train.log"), "w").close()
    grid.result(begun)
    assert execute.calls[-1] == (begun.name, [])
    # a failed run leaves no result, so the next start runs it again
    execute.fail = True
    with pytest.raises(rr.RunError):
        grid.result(failing)
    assert not os.path.exists(os.path.join(grid.run_dir(failing), "result.json"))
    execute.fail = False
    assert grid.result(failing)["name"] == failing.name
    assert len(execute.calls) == 4


def test_doc_rewrite_keeps_the_hand_written_text(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# R\n\n## Hypothesis\nH\n\n{BEGIN}\nold table\n{END}\n\n## Reading\nX\n")
    write_doc(str(doc), [BEGIN, "new table", END])
    assert doc.read_text() == f"# R\n\n## Hypothesis\nH\n\n{BEGIN}\nnew table\n{END}" \
                              f"\n\n## Reading\nX\n"
    fresh = tmp_path / "NEW.md"
    write_doc(str(fresh), [BEGIN, "t", END])
    assert fresh.read_text() == f"# Results\n\n{BEGIN}\nt\n{END}\n"


def test_bad_grid_arguments_are_one_line_errors():
    for flags in (["--seeds", "0"], ["--lr", "-1"], ["--lr-sweep", "nan"]):
        with pytest.raises(SystemExit):
            rr.parse_args(flags)


def test_end_to_end_skip_and_exact_rerun(tmp_path):
    """Two iterations of OPD on the addition toy models, evaluated every iteration: the records
    hold what the trainer logged; starting again re-runs nothing; --rerun matches exactly."""
    flags = [os.path.join(ROOT, "tools", "run_results.py"), "--parts", "addition", "--methods",
             "student", "opd", "--sweep-seeds", "1", "--addition-iters", "2", "--eval-interval",
             "1", "--eval-problems", "4", "--jobs", "1", "--output-dir", str(tmp_path / "out"),
             "--json", str(tmp_path / "results.json"), "--doc", str(tmp_path / "RESULTS.md")]

    def run(*extra):
        proc = subprocess.run([sys.executable, *flags, *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    first = run()
    assert first.count("[results]") == 2
    runs = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    opd = runs["opd"]
    assert [step for step, _ in opd["evals"]] == [0, 1, 2]
    # the trainer's iteration-0 evaluation is the untrained student's, as evaluate computes it
    assert opd["evals"][0][1] == runs["student"]["final_pass@1"]
    assert opd["final_pass@1"] == opd["evals"][-1][1] and opd["cpu_seconds"] > 0
    assert "| opd |" in (tmp_path / "RESULTS.md").read_text()
    assert "[results]" not in run()  # complete on disk: nothing re-runs
    assert "identical" in run("--rerun", "addition/addition-matched/opd_lr0.0005_seed1")
