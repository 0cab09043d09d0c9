"""The seeded results grid: every method distils a toy student towards a toy teacher for the same
iterations and samples; docs/results.json gets every run (config, seed, per-evaluation and final
greedy held-out pass@1, E[M], reverse-KL and entropy curves, time) and docs/RESULTS.md the tables
(mean ± 95% confidence interval, collapse counts) and plots made from it.

The grid's parts (`--parts`):
  main      the formats task (tasks/formats.py) with the matched student (`student-f1`): every
            method, `--seeds` seeds
  mismatch  the partly (`student-f0.3`) and wholly (`student-f0`) mismatched students for the
            student, OPD, full TrOPD and JSD
  lr        OPD and full TrOPD at the other learning rates of `--lr-sweep`, matched student
  addition  the addition task's toy models (examples/toy): every method, fewer iterations

    python tools/run_results.py                               # the whole grid (~1.5 CPU-hours)
    python tools/run_results.py --parts main --methods opd tropd-fkl --seeds 1 --iters 4 \\
        --eval-interval 2 --eval-problems 8 --output-dir /tmp/results \\
        --json /tmp/results.json --doc /tmp/RESULTS.md       # a tiny run that proves the script
    python tools/run_results.py --rerun main/formats-matched/opd_lr0.0003_seed1   # repeat, compare

Each run is one single-threaded process of `python -m megatron_tropd.train` (TP=1), `--jobs` at a
time. A run is complete once its result.json is written; a stopped grid skips those on the next
start and restarts any run it had begun (its partial directory is removed first). Runs are
deterministic given their seed: `--rerun` repeats one in a scratch directory and reports whether
its numbers are the same.
"""

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.runtime import cli  # noqa: E402
from megatron_tropd.tasks import formats, splits  # noqa: E402
from tools.results_report import (LR_METHODS, MISMATCH_METHODS, MISMATCHED, plots,  # noqa: E402
                                  read_logs, report, write_doc)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Method name -> trainer flags. "student" is the untrained baseline (evaluated, not trained).
METHODS = {
    "student": None,
    "opd": ["--distill-method", "opd"],
    "fkl": ["--distill-method", "fkl"],
    "jsd": ["--distill-method", "jsd"],
    "eopd": ["--distill-method", "eopd", "--eopd-topk", "8"],  # the same top-8 as every top-k term
    "reopold": ["--distill-method", "reopold"],
    "reopold-2stage": ["--distill-method", "reopold-2stage"],
    "tropd-mask": ["--distill-method", "tropd", "--outlier-mode", "mask"],
    "tropd-clip": ["--distill-method", "tropd", "--outlier-mode", "clip"],
    "tropd-fkl": ["--distill-method", "tropd", "--outlier-mode", "fkl"],
    "tropd-fkl+prefix": ["--distill-method", "tropd", "--outlier-mode", "fkl",
                         "--prefix-source", "online"],
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A task and its toy models: `toy` holds teacher/ and the students (HF directories)."""
    toy: str
    students: dict  # label -> model directory name under `toy`
    max_new_tokens: int  # the longest worked solution with its EOS, rounded up


SETTINGS = {
    # formats: the longest solution (5 digits, 'checked') is 34 BPE tokens with its EOS
    "formats": Setting("examples/toy_formats", {"mismatched": "student-f0",
                                                "partial": "student-f0.3",
                                                "matched": "student-f1"}, 40),
    # addition: the longest solution is 54 tokens with its EOS; a teacher-prefix row's context
    # (prompt of up to 15 tokens + full teacher response) plus this fits the models' 128 positions
    "addition": Setting("examples/toy", {"matched": "student"}, 56),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid: `part`/`student` say where it is reported."""
    part: str
    setting: str
    student: str  # a key of its setting's `students`
    method: str
    lr: float
    seed: int
    iters: int

    @property
    def name(self) -> str:
        where = f"{self.part}/{self.setting}-{self.student}"
        return (f"{where}/student" if self.method == "student"
                else f"{where}/{self.method}_lr{self.lr:g}_seed{self.seed}")


class RunError(errors.UserError):
    """A training or evaluation run failed: its log file and the last line it printed."""


def grid(args) -> list[Run]:
    """The runs of `args.parts`, in the order they are started."""
    seeds = list(range(1, args.seeds + 1))
    sweep_seeds = seeds[:args.sweep_seeds]
    runs = []

    def add(part, setting, student, methods, lrs, seeds, iters):
        for method in methods:
            if method == "student":  # untrained: the same for every seed and learning rate
                runs.append(Run(part, setting, student, method, 0.0, 0, 0))
                continue
            runs.extend(Run(part, setting, student, method, lr, seed, iters)
                        for lr in lrs for seed in seeds)

    if "main" in args.parts:
        add("main", "formats", "matched", args.methods, [args.lr], seeds, args.iters)
    if "mismatch" in args.parts:
        for student in MISMATCHED:
            add("mismatch", "formats", student, [m for m in MISMATCH_METHODS if m in args.methods],
                [args.lr], sweep_seeds, args.iters)
    if "lr" in args.parts:
        add("lr", "formats", "matched", [m for m in LR_METHODS if m in args.methods],
            [lr for lr in args.lr_sweep if lr != args.lr], sweep_seeds, args.iters)
    if "addition" in args.parts:
        add("addition", "addition", "matched", args.methods, [args.addition_lr], sweep_seeds,
            args.addition_iters)
    return runs


def _python(args, log_path) -> float:
    """Run `python args` with its output in log_path; returns the CPU seconds it used (user + sys,
    which unlike wall time does not depend on what else the machine is doing)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(cli.free_port()), OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as log:
            last = ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1]
        raise RunError(f"{log_path}: exit status {os.waitstatus_to_exitcode(status)}: {last}")
    return usage.ru_utime + usage.ru_stime


class Grid:
    """Where the grid's inputs and runs live: `<output-dir>/data/<setting>/` (task files),
    `<output-dir>/models/<setting>/<model>` (the toy models as Megatron checkpoints) and
    `<output-dir>/runs/<run name>/`."""

    def __init__(self, args):
        self.args = args
        self.root = args.output_dir
        self._data, self._models = {}, {}

    def prepare(self, runs):
        """Write the task files and convert the toy models the runs need (once, before any run
        starts: the runs only read them)."""
        for run in runs:
            setting = SETTINGS[run.setting]
            if run.setting not in self._data:
                out = os.path.join(self.root, "data", run.setting)
                self._data[run.setting] = (  # prompts and held-out split: the same at any fraction
                    formats.write_task_files(out, train=5000, heldout=500,
                                             teacher_format_fraction=0.0)
                    if run.setting == "formats" else
                    splits.write_task_files(out, train=5000, heldout=500))
            for name in ("teacher", setting.students[run.student]):
                out = os.path.join(self.root, "models", run.setting, name)
                if not os.path.isdir(out):
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    _python([os.path.join("tools", "convert_checkpoint.py"), "hf-to-megatron",
                             "--hf-dir", os.path.join(setting.toy, name), "--output-dir", out],
                            out + ".log")
                self._models[run.setting, name] = out

    def data(self, setting: str) -> dict:
        return self._data[setting]

    def model(self, setting: str, name: str) -> str:
        """The Megatron checkpoint of `setting`'s toy model `name`."""
        return self._models[setting, name]

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.root, "runs", run.name)

    def train_args(self, run: Run, save: str) -> list:
        args, setting = self.args, SETTINGS[run.setting]
        data = self.data(run.setting)
        flags = METHODS[run.method]
        rows = args.prompts_per_iteration * args.samples_per_prompt
        if "--prefix-source" in flags:  # one teacher-prefix row per prompt on top of the samples
            rows += args.prompts_per_iteration
        return [
            "--student-load", self.model(run.setting, setting.students[run.student]),
            "--teacher-load", self.model(run.setting, "teacher"), *flags,
            "--prompts", data["train_prompts"], "--prompt-template", "plain",
            "--max-prompt-length", "16", "--max-new-tokens", str(setting.max_new_tokens),
            "--teacher-topk", "8", "--prompts-per-iteration", str(args.prompts_per_iteration),
            "--samples-per-prompt", str(args.samples_per_prompt), "--micro-batch-size",
            str(rows), "--train-iters", str(run.iters), "--seed", str(run.seed),
            "--lr", str(run.lr), "--weight-decay", "0.0",
            "--lr-warmup-iters", str(min(20, run.iters // 2)),
            "--prefix-anneal-steps", str(max(1, run.iters // 2)),
            "--reopold-stage2-step", str(max(1, run.iters // 2)),
            "--eval-data", data["heldout"], "--eval-interval", str(self.eval_interval(run)),
            "--eval-limit", str(args.eval_problems), "--verifier", "addition",
            "--save", save, "--save-interval", str(run.iters), "--keep-last", "1",
            "--log-interval", "25"]

    def eval_interval(self, run: Run) -> int:
        return min(self.args.eval_interval, run.iters)

    def execute(self, run: Run, run_dir: str) -> dict:
        """Train (or, for the student, evaluate) `run` in the directory `run_dir`; its result
        record."""
        start = time.perf_counter()
        if run.method == "student":
            out = os.path.join(run_dir, "eval.json")
            cpu = _python(["-m", "megatron_tropd.evaluate", "--load",
                           self.model(run.setting, SETTINGS[run.setting].students[run.student]),
                           "--label", "student", "--data", self.data(run.setting)["heldout"],
                           "--limit", str(self.args.eval_problems), "--output", out],
                          os.path.join(run_dir, "eval.log"))
            with open(out) as f:
                evals, curves = [[0, json.load(f)["student"]["pass@1"]]], {}
        else:
            save = os.path.join(run_dir, "checkpoints")
            cpu = _python(["-m", "megatron_tropd.train", *self.train_args(run, save)],
                          os.path.join(run_dir, "train.log"))
            evals, curves = read_logs(os.path.join(save, "tensorboard"))
            shutil.rmtree(save)  # the figures are in the record; the weights are not needed
        return {**dataclasses.asdict(run), "name": run.name,
                "flags": METHODS[run.method] or [], "final_pass@1": evals[-1][1],
                "evals": evals, "curves": curves,
                "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu, 1)}

    def result(self, run: Run) -> dict:
        """`run`'s record: read if it is complete on disk, otherwise (re)run from scratch."""
        run_dir = self.run_dir(run)
        result_file = os.path.join(run_dir, "result.json")
        if os.path.isfile(result_file):
            with open(result_file) as f:
                return json.load(f)
        shutil.rmtree(run_dir, ignore_errors=True)  # begun but not finished: start again
        os.makedirs(run_dir)
        result = self.execute(run, run_dir)
        tmp = result_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, result_file)  # complete only once whole
        print(f"[results] {run.name}: pass@1 {result['final_pass@1']:.3f} "
              f"({result['seconds']} s, {result['cpu_seconds']} CPU s)", flush=True)
        return result


def rerun(grid_: Grid, runs, name: str):
    """Repeat the finished run `name` in a scratch directory; exit 0 if its numbers match."""
    runs = {run.name: run for run in runs}
    if name not in runs:
        sys.exit(f"error: no run named {name!r} in this grid (e.g. {next(iter(runs))})")
    path = os.path.join(grid_.run_dir(runs[name]), "result.json")
    if not os.path.isfile(path):
        sys.exit(f"error: {name} has not finished ({path} missing)")
    with open(path) as f:
        stored = json.load(f)
    grid_.prepare([runs[name]])
    with tempfile.TemporaryDirectory() as scratch:
        again = grid_.execute(runs[name], scratch)
    same = all(again[k] == stored[k] for k in ("final_pass@1", "evals", "curves"))
    print(f"{name}: stored final pass@1 {stored['final_pass@1']}, re-run "
          f"{again['final_pass@1']}; evaluations and curves "
          f"{'identical' if same else 'DIFFER'}")
    sys.exit(0 if same else 1)


def parse_args(argv=None):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--parts", nargs="+", default=["main", "mismatch", "lr", "addition"],
                        choices=["main", "mismatch", "lr", "addition"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N of the main table")
    parser.add_argument("--sweep-seeds", type=int, default=3,
                        help="seeds 1..N of the mismatch, lr and addition parts")
    parser.add_argument("--iters", type=int, default=300, help="formats task")
    parser.add_argument("--lr", type=float, default=3e-4, help="formats task")
    parser.add_argument("--lr-sweep", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--addition-iters", type=int, default=100)
    parser.add_argument("--addition-lr", type=float, default=5e-4)
    parser.add_argument("--prompts-per-iteration", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--output-dir", default="runs/results")
    parser.add_argument("--json", default="docs/results.json")
    parser.add_argument("--doc", default="docs/RESULTS.md")
    parser.add_argument("--rerun", metavar="RUN", help="repeat one finished run and compare")
    args = parser.parse_args(argv)
    for name in ("seeds", "sweep_seeds", "iters", "addition_iters", "eval_interval",
                 "eval_problems", "jobs", "prompts_per_iteration", "samples_per_prompt"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.lr, args.addition_lr, *args.lr_sweep) <= 0 or not all(
            map(math.isfinite, (args.lr, args.addition_lr, *args.lr_sweep))):
        parser.error("learning rates must be positive and finite")
    return args


def main():
    args = parse_args()
    grid_ = Grid(args)
    runs = grid(args)
    if args.rerun:
        rerun(grid_, runs, args.rerun)
    grid_.prepare(runs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(grid_.result, runs))
    for path in (args.json, args.doc):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": sys.argv[1:], "runs": results}, f, indent=1)
        f.write("\n")
    write_doc(args.doc, report(results, args, plots(results, args,
                                                   os.path.dirname(os.path.abspath(args.doc)))))
    print(f"wrote {args.json} and {args.doc}")


if __name__ == "__main__":
    errors.run_main(main)  # after a failed run the finished ones stay on disk: fix it, re-run
