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
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.runtime import cli
from megatron_tropd.tasks import formats, splits  # noqa: E402

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
FULL_TROPD = "tropd-fkl+prefix"
MISMATCH_METHODS = ("student", "opd", FULL_TROPD, "jsd")
MISMATCHED = ("partial", "mismatched")  # the formats students of the mismatch part
LR_METHODS = ("opd", FULL_TROPD)


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
CURVES = {"trusted_fraction": "trusted fraction E[M]", "k1_reverse_kl": "reverse KL (k1 estimate)",
          "entropy_student": "student entropy on its samples"}
# A run collapsed when its final pass@1 is below half of its starting student's.
COLLAPSE_RATIO = 0.5
# The doc's generated part lies between these lines; the hand-written text around them is kept.
BEGIN, END = "<!-- results: written by tools/run_results.py -->", "<!-- end of results -->"
# two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


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


def read_logs(log_dir: str):
    """([[iteration, eval pass@1]], {curve: [[iteration, value]]}) of one run's TensorBoard log,
    the curves every 5th logged iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    evals = [[e.step, round(e.value, 6)] for e in events.Scalars("eval/pass@1")]
    curves = {m: [[e.step, round(e.value, 5)] for e in events.Scalars(f"train/{m}")
                  if e.step % 5 == 0] for m in CURVES if f"train/{m}" in tags}
    return evals, curves


def mean_ci(values):
    """Mean and half-width of its two-sided 95% Student-t confidence interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T_975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def collapsed(result: dict) -> bool:
    """Final pass@1 below `COLLAPSE_RATIO` of the run's starting student's (its iteration-0
    evaluation)."""
    return result["final_pass@1"] < COLLAPSE_RATIO * result["evals"][0][1]


def select(results, part, method, lr=None, student=None):
    """The records of `method` in `part` (the student baseline has no learning rate)."""
    return [r for r in results if r["part"] == part and r["method"] == method
            and (lr is None or method == "student" or r["lr"] == lr)
            and (student is None or r["student"] == student)]


def lr_sweep(results, method, args):
    """`method`'s records at every learning rate of the sweep (the main one's: the sweep's
    seeds)."""
    return select(results, "lr", method) + [r for r in select(results, "main", method, args.lr)
                                            if r["seed"] <= args.sweep_seeds]


def by_level(results, method, lr):
    """{mismatch level: records}: matched from the main table, the others from the mismatch
    part."""
    return {"matched": select(results, "main", method, lr),
            **{level: select(results, "mismatch", method, lr, level) for level in MISMATCHED}}


def cell(runs) -> str:
    """'mean ± CI' of the runs' final pass@1."""
    if not runs:
        return "-"
    mean, half = mean_ci([r["final_pass@1"] for r in runs])
    return f"{mean:.3f} ± {half:.3f}"


def per_seed(runs) -> str:
    return ", ".join(f"{r['final_pass@1']:.3f}" for r in runs)


def mean_curve(runs, key=None):
    """[(iteration, seed-mean)] of the runs' eval pass@1 (or curve `key`), over the iterations
    every run has."""
    series = [r["evals"] if key is None else r["curves"].get(key, []) for r in runs]
    series = [s for s in series if s]
    if not series:
        return []
    length = min(len(s) for s in series)
    return [(series[0][i][0], statistics.fmean(s[i][1] for s in series)) for i in range(length)]


def plateau_iteration(curve, tolerance=0.02):
    """The first evaluated iteration whose value is within `tolerance` of the curve's best."""
    best = max(value for _, value in curve)
    return next(step for step, value in curve if value >= best - tolerance)


def plots(results, args, doc_dir):
    """The PNGs of the doc: [(caption, file name)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, ax, name, caption, xlabel, ylabel):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(caption, fontsize=9)
        ax.legend(fontsize=7)
        fig.savefig(os.path.join(doc_dir, name), dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append((caption, name))

    main = [m for m in args.methods if select(results, "main", m)]
    for key, label in [(None, "held-out greedy pass@1"), *CURVES.items()]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for method in main:
            curve = mean_curve(select(results, "main", method), key)
            if len(curve) > 1:
                ax.plot(*zip(*curve), label=method)
                drawn = True
        if drawn:
            save(fig, ax, f"results_{key or 'pass_at_1'}.png",
                 f"main (matched student): {label}, mean over seeds", "iteration", label)
        else:
            plt.close(fig)
    levels = {m: by_level(results, m, args.lr) for m in MISMATCH_METHODS}
    levels = {m: by for m, by in levels.items() if all(by.values())}
    if levels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, level in enumerate(("matched", *MISMATCHED)):
            stats = [mean_ci([r["final_pass@1"] for r in by[level]]) for by in levels.values()]
            ax.bar([j + 0.27 * (i - 1) for j in range(len(levels))], [s[0] for s in stats], 0.27,
                   yerr=[s[1] for s in stats], capsize=3, label=f"{level} student")
        ax.set_xticks(range(len(levels)), list(levels))
        save(fig, ax, "results_mismatch.png", "final pass@1 (mean ± 95% CI) by mismatch level",
             "method", "held-out pass@1")
    lr_methods = [m for m in LR_METHODS if select(results, "lr", m)]
    if lr_methods:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in lr_methods:
            runs = lr_sweep(results, method, args)
            lrs = sorted({r["lr"] for r in runs})
            stats = [mean_ci([r["final_pass@1"] for r in runs if r["lr"] == lr]) for lr in lrs]
            ax.errorbar(lrs, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3,
                        marker="o", label=method)
            ax.scatter([r["lr"] for r in runs], [r["final_pass@1"] for r in runs], s=8,
                       alpha=0.4)
        ax.set_xscale("log")
        save(fig, ax, "results_lr.png", "final pass@1 by learning rate (dots: seeds)",
             "learning rate", "held-out pass@1")
    return files


def report(results, args, plot_files) -> list:
    """The generated lines of docs/RESULTS.md."""
    cpu = sum(r["cpu_seconds"] for r in results)
    wall = sum(r["seconds"] for r in results) / args.jobs
    lines = [
        BEGIN, "",
        f"Written by `python tools/run_results.py {' '.join(sys.argv[1:])}`".rstrip() + " from "
        f"`{os.path.relpath(args.json, os.path.dirname(os.path.abspath(args.doc)))}`.",
        "",
        f"Every run: {args.prompts_per_iteration} prompts x {args.samples_per_prompt} samples "
        f"per iteration at temperature 1, teacher top-8 for the top-k terms, greedy pass@1 on the "
        f"first {args.eval_problems} held-out problems every {args.eval_interval} iterations. "
        f"Formats task: {args.iters} iterations at lr {args.lr:g}; addition task: "
        f"{args.addition_iters} iterations at lr {args.addition_lr:g}. A run *collapsed* when "
        f"its final pass@1 is below {COLLAPSE_RATIO:g}x its starting student's. CPU budget: "
        f"{len(results)} runs used {cpu / 3600:.2f} CPU-hours (user + sys, one single-threaded "
        f"process each), {args.jobs} at a time: about {wall / 60:.0f} min of wall time.",
    ]

    def method_table(part, lr):
        rows = ["| method | final pass@1 mean ± 95% CI | best evaluation (mean) | collapsed "
                "| per seed |", "|---|---|---|---|---|"]
        for method in args.methods:
            runs = select(results, part, method, lr)
            if runs:
                best = statistics.fmean(max(v for _, v in r["evals"]) for r in runs)
                rows.append(f"| {method} | {cell(runs)} | {best:.3f} | "
                            f"{sum(map(collapsed, runs))}/{len(runs)} | "
                            f"{per_seed(runs)} |")
        return rows

    if select(results, "main", "opd") or select(results, "main", "student"):
        lines += ["", "### Main table: formats task, matched student (`student-f1`)", "",
                  *method_table("main", args.lr)]
        trained = [m for m in args.methods if m != "student" and select(results, "main", m)]
        best = max(trained, key=lambda m: mean_ci(
            [r["final_pass@1"] for r in select(results, "main", m, args.lr)])[0], default=None)
        for method in dict.fromkeys(m for m in ("opd", best) if m in trained):
            curve = mean_curve(select(results, "main", method, args.lr))
            if len(curve) > 1:
                stop = plateau_iteration(curve)
                lines += ["", f"{method}'s seed-mean pass@1 curve comes within 0.02 of its best "
                          f"at iteration {stop}; the runs go to {args.iters} "
                          f"({args.iters / max(stop, 1):.1f}x)."]
    if select(results, "mismatch", "opd"):
        lines += ["", "### Mismatch: matched (`student-f1`, the main table's seeds), partly "
                  "(`student-f0.3`) and wholly (`student-f0`) mismatched students", "",
                  "| method | matched | partial | mismatched | collapsed (matched, partial, "
                  "mismatched) |", "|---|---|---|---|---|"]
        for method in MISMATCH_METHODS:
            by = by_level(results, method, args.lr)
            lines.append(f"| {method} | {' | '.join(cell(runs) for runs in by.values())} | "
                         + ", ".join(f"{sum(map(collapsed, runs))}/{len(runs)}"
                                     for runs in by.values()) + " |")
    if select(results, "lr", "opd"):
        lines += ["", f"### Learning rate: matched student (seeds 1..{args.sweep_seeds})", "",
                  "| method | lr | final pass@1 mean ± 95% CI | collapsed | per seed |",
                  "|---|---|---|---|---|"]
        for method in LR_METHODS:
            sweep = lr_sweep(results, method, args)
            for lr in sorted({r["lr"] for r in sweep}):
                runs = [r for r in sweep if r["lr"] == lr]
                if runs:
                    lines.append(f"| {method} | {lr:g} | {cell(runs)} | "
                                 f"{sum(map(collapsed, runs))}/{len(runs)} | "
                                 f"{per_seed(runs)} |")
    if select(results, "addition", "opd") or select(results, "addition", "student"):
        lines += ["", "### Second setting: the addition task (`examples/toy`)", "",
                  *method_table("addition", args.addition_lr)]
    for caption, name in plot_files:
        lines += ["", f"![{caption}]({name})"]
    return lines + ["", END]


def write_doc(path, generated):
    """Replace the generated part of `path` (or append it), keeping the hand-written text."""
    text = open(path).read() if os.path.isfile(path) else "# Results\n\n"
    if BEGIN in text and END in text:
        head, tail = text[:text.index(BEGIN)], text[text.index(END) + len(END):]
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    with open(path, "w") as f:
        f.write(head + "\n".join(generated) + tail)


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
