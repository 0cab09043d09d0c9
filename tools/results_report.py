"""The analysis half of the results grid (tools/run_results.py runs it): the grid's parts its
tables are laid out by, a run's TensorBoard log read into its record, the statistics over seeds
(mean ± 95% Student-t confidence interval, collapse), the PNG plots and the generated part of
docs/RESULTS.md.
"""

import os
import statistics
import sys

# The methods and students of the parts beyond the main table: tools/run_results.py runs these
# cells and the report lays out its tables by them.
FULL_TROPD = "tropd-fkl+prefix"
MISMATCH_METHODS = ("student", "opd", FULL_TROPD, "jsd")
MISMATCHED = ("partial", "mismatched")  # the formats students of the mismatch part
LR_METHODS = ("opd", FULL_TROPD)

CURVES = {"trusted_fraction": "trusted fraction E[M]", "k1_reverse_kl": "reverse KL (k1 estimate)",
          "entropy_student": "student entropy on its samples"}
# A run collapsed when its final pass@1 is below half of its starting student's.
COLLAPSE_RATIO = 0.5
# The doc's generated part lies between these lines; the hand-written text around them is kept.
BEGIN, END = "<!-- results: written by tools/run_results.py -->", "<!-- end of results -->"
# two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


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
