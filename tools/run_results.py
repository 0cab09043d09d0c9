"""The seeded results experiment: every method distils the embedded toy student towards the toy
teacher for the same iterations and samples, over several seeds, and docs/RESULTS.md gets greedy
held-out pass@1 as mean ± 95% confidence interval per method, plots of the trusted fraction and of
the reverse KL from the TensorBoard logs, and the ordering the numbers show.

    python tools/run_results.py                          # the full table (3 seeds, every method)
    python tools/run_results.py --seeds 1 --iters 2 --eval-problems 8 --methods opd tropd-fkl \\
        --output-dir /tmp/results --doc /tmp/RESULTS.md   # a tiny run that proves the script

Each run is one process (TP=1) of `python -m megatron_tropd.train`; `--jobs` runs several at once.
Runs are deterministic given their seed, so re-running with the same seeds reproduces the table.
"""

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import cli  # noqa: E402
from megatron_tropd.checkpointing import latest_checkpoint  # noqa: E402
from megatron_tropd.tasks.splits import write_task_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Method name -> trainer flags. "student" is the untrained baseline; "sft" continues supervised
# training of the student on worked solutions (same iterations, same rows per iteration).
METHODS = {
    "student": None,
    "sft": ["--mode", "sft"],
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
# The longest worked solution is 54 tokens with its EOS; a teacher-prefix row's context (prompt
# of up to 15 tokens + full teacher response) plus this still fits the models' 128 positions.
MAX_NEW_TOKENS = 56
CURVES = {"trusted_fraction": "trusted fraction E[M]", "k1_reverse_kl": "reverse KL (k1 estimate)",
          "entropy_student": "student entropy on its samples"}
# The doc's hand-written reading of the numbers starts at this heading; a re-run keeps it.
READING = "## Reading"
# two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def _python(args, log_path):
    """Run `python args` with its output in log_path; returns the CPU seconds it used (user + sys,
    which unlike wall time does not depend on what else the machine is doing)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(cli.free_port()),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as log:
            last = ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1]
        raise RunError(f"{log_path}: exit status {proc.returncode}: {last}")
    return usage.ru_utime + usage.ru_stime


class RunError(Exception):
    """A training or evaluation run failed: its log file and the last line it printed."""


def train_args(method, seed, args, data, student, teacher, save):
    flags = METHODS[method]
    common = ["--student-load", student, "--prompt-template", "plain", "--max-prompt-length", "16",
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--train-iters", str(args.iters),
              "--seed", str(seed), "--lr", str(args.lr), "--weight-decay", "0.0",
              # the quickstart's warm-up: fewer warm-up than training iterations, at most 20
              "--lr-warmup-iters", str(min(20, args.iters // 2)), "--save", save,
              "--save-interval", str(args.iters), "--log-interval", "10"]
    rows = args.prompts_per_iteration * args.samples_per_prompt
    if flags[:2] == ["--mode", "sft"]:
        return common + flags + ["--sft-data", data["train_sft"], "--prompts-per-iteration",
                                 str(rows), "--micro-batch-size", str(rows)]
    if "--prefix-source" in flags:  # one teacher-prefix row per prompt on top of the samples
        rows += args.prompts_per_iteration
    return common + flags + [
        "--teacher-load", teacher, "--prompts", data["train_prompts"], "--teacher-topk", "8",
        "--prompts-per-iteration", str(args.prompts_per_iteration),
        "--samples-per-prompt", str(args.samples_per_prompt), "--micro-batch-size", str(rows),
        "--prefix-anneal-steps", str(max(1, args.iters // 2)),
        "--reopold-stage2-step", str(max(1, args.iters // 2))]


def evaluate(load, args, data, out):
    """(greedy held-out pass@1, CPU seconds)"""
    cpu = _python(["-m", "megatron_tropd.evaluate", "--load", load, "--label", "run", "--data",
                   data["heldout"], "--limit", str(args.eval_problems), "--output", out],
                  out + ".log")
    with open(out) as f:
        return json.load(f)["run"]["pass@1"], cpu


def one_run(method, seed, args, data, student, teacher):
    run_dir = os.path.join(args.output_dir, "runs", f"{method}_seed{seed}")
    result_file = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_file):  # finished earlier: the runs are deterministic
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    load, cpu = student, 0.0
    if METHODS[method] is not None:
        save = os.path.join(run_dir, "checkpoints")
        cpu = _python(["-m", "megatron_tropd.train",
                       *train_args(method, seed, args, data, student, teacher, save)],
                      os.path.join(run_dir, "train.log"))
        load = latest_checkpoint(save)
    pass1, eval_cpu = evaluate(load, args, data, os.path.join(run_dir, "eval.json"))
    result = {"method": method, "seed": seed, "pass@1": pass1,
              "seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(cpu + eval_cpu, 1)}
    with open(result_file, "w") as f:
        json.dump(result, f)
    print(f"[results] {method} seed {seed}: pass@1 {result['pass@1']:.3f} "
          f"({result['seconds']} s, {result['cpu_seconds']} CPU s)", flush=True)
    return result


def mean_ci(values):
    """Mean and half-width of its two-sided 95% Student-t confidence interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T_975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def read_curves(run_dir):
    """{metric: [(step, value)]} of one run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = os.path.join(run_dir, "checkpoints", "tensorboard")
    if not os.path.isdir(log_dir):
        return {}
    events = EventAccumulator(log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {m: [(e.step, e.value) for e in events.Scalars(f"train/{m}")]
            for m in CURVES if f"train/{m}" in tags}


def plot(methods, seeds, args, doc_dir):
    """One PNG per curve: the seed-mean of every method that logs it. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for metric, label in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for method in methods:
            runs = [read_curves(os.path.join(args.output_dir, "runs", f"{method}_seed{s}"))
                    .get(metric) for s in seeds]
            runs = [r for r in runs if r]
            if not runs:
                continue
            length = min(len(r) for r in runs)
            steps = [step for step, _ in runs[0][:length]]
            ax.plot(steps, [statistics.fmean(r[i][1] for r in runs) for i in range(length)],
                    label=method)
            drawn = True
        if drawn:
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            ax.set_title(f"{label}, mean over {len(seeds)} seed(s)")
            ax.legend(fontsize=7)
            name = f"results_{metric}.png"
            fig.savefig(os.path.join(doc_dir, name), dpi=100, bbox_inches="tight")
            files.append((label, name))
        plt.close(fig)
    return files


def write_doc(results, methods, seeds, args, plots):
    rows = []
    for method in methods:
        values = [r["pass@1"] for r in results if r["method"] == method]
        rows.append((method, *mean_ci(values), values))
    lines = [
        "# Results: the seeded method table on the built-in task",
        "",
        f"Written by `python tools/run_results.py {' '.join(sys.argv[1:])}`".rstrip() + ".",
        "",
        f"Setting: the embedded toy teacher and student (`examples/toy`, `models.json`), "
        f"multi-digit addition with carry steps; {args.iters} iterations x "
        f"{args.prompts_per_iteration} prompts x {args.samples_per_prompt} samples at "
        f"temperature 1, lr {args.lr}, teacher top-8 for the top-k terms; greedy pass@1 on the "
        f"first {args.eval_problems} held-out problems; seeds {', '.join(map(str, seeds))}. "
        f"CPU budget: the runs used {sum(r['cpu_seconds'] for r in results) / 60:.1f} CPU-minutes "
        f"in all (training and evaluation, one single-threaded process each, user + sys time), "
        f"{args.jobs} at a time; wall time {sum(r['seconds'] for r in results) / 60 / args.jobs:.0f}"
        f" min on a 2-core machine shared with other work.",
        "",
        "| method | pass@1 mean ± 95% CI | per seed |",
        "|---|---|---|",
    ]
    for method, mean, half, values in rows:
        lines.append(f"| {method} | {mean:.3f} ± {half:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in values)} |")
    ranked = sorted(rows, key=lambda r: -r[1])
    lines += ["", "Ordering by mean: " + " > ".join(r[0] for r in ranked) + "."]
    by_name = {r[0]: r for r in rows}
    if "opd" in by_name and "tropd-fkl" in by_name:
        _, m_opd, h_opd, _ = by_name["opd"][:4]
        _, m_tr, h_tr, _ = by_name["tropd-fkl"][:4]
        separated = m_tr - h_tr > m_opd + h_opd
        lines.append(
            f"TrOPD (top-k FKL outliers) {m_tr:.3f} vs OPD {m_opd:.3f}: the 95% intervals "
            f"{'do not overlap (TrOPD ahead)' if separated else 'overlap or TrOPD is not ahead'}"
            f" at {len(seeds)} seed(s).")
    for label, name in plots:
        lines += ["", f"![{label}]({name})"]
    reading = ""
    if os.path.isfile(args.doc):
        with open(args.doc) as f:
            previous = f.read()
        if READING in previous:
            reading = "\n" + previous[previous.index(READING):]
    with open(args.doc, "w") as f:
        f.write("\n".join(lines) + "\n" + reading)


def main():
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--toy", default="examples/toy", help="directory with teacher/, student/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--prompts-per-iteration", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-problems", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--output-dir", default="runs/results")
    parser.add_argument("--doc", default="docs/RESULTS.md")
    args = parser.parse_args()
    data = write_task_files(os.path.join(args.output_dir, "data"), train=5000, heldout=500)
    models = {}
    for name in ("teacher", "student"):
        models[name] = os.path.join(args.output_dir, name)
        if not os.path.isdir(models[name]):
            _python([os.path.join("tools", "convert_checkpoint.py"), "hf-to-megatron", "--hf-dir",
                     os.path.join(args.toy, name), "--output-dir", models[name]],
                    models[name] + ".log")
    # the untrained student's greedy pass@1 is the same for every seed: evaluated once
    jobs = [(m, s) for m in args.methods for s in (args.seeds if METHODS[m] else args.seeds[:1])]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda job: one_run(*job, args, data, models["student"], models["teacher"]), jobs))
    doc_dir = os.path.dirname(os.path.abspath(args.doc))
    os.makedirs(doc_dir, exist_ok=True)
    plots = plot(args.methods, args.seeds, args, doc_dir)
    write_doc(results, args.methods, args.seeds, args, plots)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    try:
        main()
    except RunError as e:  # the finished runs stay cached; fix the cause and re-run
        sys.exit(f"error: {e}")
