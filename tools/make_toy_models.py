"""Make the embedded toy teacher and student of a built-in task, as HF checkpoints.

Both are trained from scratch with the trainer's SFT mode (one process, TP=1) on worked solutions:
the teacher (4 layers, hidden 96) until it solves held-out problems well, the student (2 layers,
hidden 64) stopped early, so that it is weaker by size and by training, the mismatch on-policy
distillation targets. Each is exported with `megatron_to_hf` (safetensors + config.json) together
with the tokenizer, and evaluated (greedy pass@1 on the held-out split); the figures and times go to
`<output-dir>/models.json`.

`--task formats` (tasks/formats.py) makes the several-formats variant with a BPE tokenizer: the
teacher on its three formats, and one student per `--teacher-format-fractions` value (the share of
its SFT rows in a teacher format; `student-f1` matched, `student-f0` mismatched), each with the
formats of its greedy held-out answers in models.json.

    python tools/make_toy_models.py --output-dir examples/toy
    python tools/make_toy_models.py --task formats --output-dir examples/toy_formats \\
        --teacher-iters 3000 --teacher-stop 3000 --teacher-min-lr 1e-4 \\
        --teacher-format-fractions 1 0.3 0 --student-iters 1500 --student-stop 700 450 300

(examples/toy_formats/models.json holds that command's figures.) The formats students stop at
different iterations (one `--student-stop` per fraction) so that all start at about the same
held-out pass@1 (~22%): a student learns its own paren format faster than the teacher's ones, so
the more paren rows it has, the earlier it stops.
"""

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
from megatron_tropd.checkpoint.checkpointer import latest_checkpoint  # noqa: E402
from megatron_tropd.models.arch import ModelArch  # noqa: E402
from megatron_tropd.runtime import cli
from megatron_tropd.tasks import formats  # noqa: E402
from megatron_tropd.tasks.addition import ALPHABET  # noqa: E402
from megatron_tropd.tasks.splits import write_task_files  # noqa: E402

# the tokenizer's pieces: the addition alphabet and <unk> <s> </s> <pad>, or the formats' BPE
VOCAB_SIZE = {"addition": len(ALPHABET) + 4, "formats": 384}
# longest sequence: 69 tokens (<s>, 5-digit prompt, 5 steps, answer, </s>) for addition
MAX_LENGTH = 128


def _arches(task: str):
    teacher = ModelArch(family="qwen3", vocab_size=VOCAB_SIZE[task], hidden_size=96,
                        ffn_hidden_size=384, num_layers=4, num_attention_heads=4,
                        num_query_groups=4, max_position_embeddings=MAX_LENGTH)
    student = ModelArch(family="qwen3", vocab_size=VOCAB_SIZE[task], hidden_size=64,
                        ffn_hidden_size=256, num_layers=2, num_attention_heads=4,
                        num_query_groups=2, max_position_embeddings=MAX_LENGTH)
    return teacher, student
TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)


def _python(*args, **kwargs):
    """`python args` in the repository; a failure (its output above) is a one-line error."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(cli.free_port()))
    status = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, **kwargs).returncode
    if status:
        raise errors.UserError(f"`python {' '.join(args)}` failed (exit status {status})")


def sft(arch: ModelArch, name: str, work: str, sft_data: str, tokenizer: str, iters: int,
        stop: int, lr: float, min_lr: float, seed: int) -> str:
    """Train `arch` from scratch on the worked solutions with a cosine schedule of `iters`
    iterations, stopped after `stop` of them; returns the checkpoint dir."""
    config = os.path.join(work, f"{name}_config.json")
    with open(config, "w") as f:
        json.dump(arch.to_hf_config(), f)
    save = os.path.join(work, name)
    _python("-m", "megatron_tropd.train", "--mode", "sft", "--sft-data", sft_data,
            "--student-config", config, "--tokenizer", tokenizer, "--prompt-template", "plain",
            "--max-prompt-length", "16", "--max-new-tokens", "64", "--train-iters", str(iters),
            "--prompts-per-iteration", "64", "--micro-batch-size", "64", "--lr", str(lr),
            "--min-lr", str(min_lr), "--lr-decay-style", "cosine", "--lr-warmup-iters",
            str(min(50, iters // 5)), "--log-interval", "25", "--seed", str(seed),
            "--save", save, "--exit-interval", str(stop))
    return latest_checkpoint(save)


def export(megatron_dir: str, tokenizer: str, output: str):
    """HF directory: safetensors weights, config.json and the tokenizer."""
    _python(os.path.join(TOOLS, "convert_checkpoint.py"), "megatron-to-hf", "--megatron-dir",
            megatron_dir, "--output-dir", output, "--overwrite")
    shutil.copyfile(tokenizer, os.path.join(output, "tokenizer.model"))


def _parameters(hf_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def heldout_pass_at_1(hf_dir: str, heldout: str, work: str) -> dict:
    """evaluate's figures, plus how many greedy answers each format of tasks/formats.py has."""
    out = os.path.join(work, os.path.basename(hf_dir) + "_eval.json")
    responses = out + ".responses.jsonl"
    _python("-m", "megatron_tropd.evaluate", "--load", hf_dir, "--data", heldout,
            "--output", out, "--label", os.path.basename(hf_dir), "--save-responses", responses)
    with open(out) as f:
        result = json.load(f)[os.path.basename(hf_dir)]
    with open(responses) as f:
        found = [formats.format_of(json.loads(line)["response"]) for line in f]
    result["greedy_formats"] = {str(fmt): found.count(fmt) for fmt in sorted(
        set(found), key=str)}
    return result


def _task_data(args, work: str):
    """(tokenizer, held-out file, [(model name, arch, SFT file, schedule, stop, min LR)])."""
    tokenizer = os.path.join(work, "tokenizer.model")
    _python(os.path.join(TOOLS, "train_tokenizer.py"), "--output", tokenizer, "--task",
            args.task, "--vocab-size", str(VOCAB_SIZE["formats"]))
    teacher, student = _arches(args.task)
    teacher_run = (args.teacher_iters, args.teacher_stop, args.teacher_min_lr)
    if args.task == "addition":
        data = write_task_files(os.path.join(work, "data"), train=50000, heldout=500)
        student_run = (args.student_iters, args.student_stop[0], args.student_min_lr)
        return tokenizer, data["heldout"], [("teacher", teacher, data["train_sft"], *teacher_run),
                                            ("student", student, data["train_sft"], *student_run)]
    models = []
    for fraction, stop in zip(args.teacher_format_fractions, args.student_stop):
        student_run = (args.student_iters, stop, args.student_min_lr)
        data = formats.write_task_files(os.path.join(work, f"data_f{fraction:g}"), train=50000,
                                        heldout=500, teacher_format_fraction=fraction)
        if not models:  # the teacher's rows and the splits are the same at every fraction
            models.append(("teacher", teacher, data["teacher_sft"], *teacher_run))
        models.append((f"student-f{fraction:g}", student, data["student_sft"], *student_run))
    return tokenizer, data["heldout"], models


def main():
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--output-dir", default="examples/toy")
    parser.add_argument("--work-dir", help="intermediate files (default: a temporary directory)")
    parser.add_argument("--teacher-iters", type=int, default=600, help="of the LR schedule")
    parser.add_argument("--teacher-stop", type=int, default=400, help="iterations trained")
    parser.add_argument("--student-iters", type=int, default=600, help="of the LR schedule")
    parser.add_argument("--student-stop", type=int, nargs="+", default=[225],
                        help="iterations trained (formats: one value, or one per fraction)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak LR of both")
    parser.add_argument("--teacher-min-lr", type=float, default=2e-4)
    parser.add_argument("--student-min-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--task", choices=("addition", "formats"), default="addition")
    parser.add_argument("--teacher-format-fractions", type=float, nargs="+",
                        default=[1.0, 0.3, 0.0],
                        help="formats: one student per share of its SFT rows in teacher formats")
    args = parser.parse_args()
    fractions = args.teacher_format_fractions if args.task == "formats" else [None]
    if len(args.student_stop) == 1:
        args.student_stop *= len(fractions)
    if len(args.student_stop) != len(fractions):
        parser.error(f"--student-stop takes one value or one per student ({len(fractions)})")
    work = args.work_dir or tempfile.mkdtemp(prefix="toy_models_")
    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer, heldout, models = _task_data(args, work)
    report = {}
    for name, arch, sft_data, iters, stop, min_lr in models:
        start = time.perf_counter()
        checkpoint = sft(arch, name, work, sft_data, tokenizer, iters, stop, args.lr, min_lr,
                         args.seed)
        seconds = time.perf_counter() - start
        hf_dir = os.path.join(args.output_dir, name)
        export(checkpoint, tokenizer, hf_dir)
        result = heldout_pass_at_1(hf_dir, heldout, work)
        report[name] = {"sft_iterations": stop, "schedule_iterations": iters, "batch": 64,
                        "lr": args.lr,
                        "min_lr": min_lr,
                        "train_seconds": round(seconds), "heldout_pass@1": result["pass@1"],
                        "heldout_greedy": result["greedy"],
                        "heldout_greedy_formats": result["greedy_formats"],
                        "parameters": _parameters(hf_dir)}
        print(f"[toy] {name}: {stop} SFT iterations in {seconds:.0f} s, held-out pass@1 "
              f"{result['pass@1']:.3f}", flush=True)
    with open(os.path.join(args.output_dir, "models.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    errors.run_main(main)
