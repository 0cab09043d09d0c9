"""Make the embedded toy teacher and student for the built-in addition task, as HF checkpoints.

Both are trained from scratch with the trainer's SFT mode (one process, TP=1) on worked solutions:
the teacher (4 layers, hidden 96) until it solves held-out problems well, the student (2 layers,
hidden 64) stopped early, so that it is weaker by size and by training, the mismatch on-policy
distillation targets. Each is exported with `megatron_to_hf` (safetensors + config.json) together
with the tokenizer, and evaluated (greedy pass@1 on the held-out split); the figures and times go to
`<output-dir>/models.json`.

    python tools/make_toy_models.py --output-dir examples/toy
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

from megatron_tropd import cli  # noqa: E402
from megatron_tropd.checkpointing import latest_checkpoint  # noqa: E402
from megatron_tropd.models.arch import ModelArch  # noqa: E402
from megatron_tropd.tasks.addition import ALPHABET  # noqa: E402
from megatron_tropd.tasks.splits import write_task_files  # noqa: E402

VOCAB_SIZE = len(ALPHABET) + 4  # the tokenizer's pieces: the alphabet and <unk> <s> </s> <pad>
MAX_LENGTH = 128  # longest sequence: 69 tokens (<s>, 5-digit prompt, 5 steps, answer, </s>)
TEACHER = ModelArch(family="qwen3", vocab_size=VOCAB_SIZE, hidden_size=96, ffn_hidden_size=384,
                    num_layers=4, num_attention_heads=4, num_query_groups=4,
                    max_position_embeddings=MAX_LENGTH)
STUDENT = ModelArch(family="qwen3", vocab_size=VOCAB_SIZE, hidden_size=64, ffn_hidden_size=256,
                    num_layers=2, num_attention_heads=4, num_query_groups=2,
                    max_position_embeddings=MAX_LENGTH)
TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)


def _python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(cli.free_port()))
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env, **kwargs)


def sft(arch: ModelArch, name: str, work: str, data: dict, tokenizer: str, iters: int,
        stop: int, lr: float, min_lr: float, seed: int) -> str:
    """Train `arch` from scratch on the worked solutions with a cosine schedule of `iters`
    iterations, stopped after `stop` of them; returns the checkpoint dir."""
    config = os.path.join(work, f"{name}_config.json")
    with open(config, "w") as f:
        json.dump(arch.to_hf_config(), f)
    save = os.path.join(work, name)
    _python("-m", "megatron_tropd.train", "--mode", "sft", "--sft-data", data["train_sft"],
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
    out = os.path.join(work, os.path.basename(hf_dir) + "_eval.json")
    _python("-m", "megatron_tropd.evaluate", "--load", hf_dir, "--data", heldout,
            "--output", out, "--label", os.path.basename(hf_dir))
    with open(out) as f:
        return json.load(f)[os.path.basename(hf_dir)]


def main():
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--output-dir", default="examples/toy")
    parser.add_argument("--work-dir", help="intermediate files (default: a temporary directory)")
    parser.add_argument("--teacher-iters", type=int, default=600, help="of the LR schedule")
    parser.add_argument("--teacher-stop", type=int, default=400, help="iterations trained")
    parser.add_argument("--student-iters", type=int, default=600, help="of the LR schedule")
    parser.add_argument("--student-stop", type=int, default=225, help="iterations trained")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak LR of both")
    parser.add_argument("--teacher-min-lr", type=float, default=2e-4)
    parser.add_argument("--student-min-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="toy_models_")
    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer = os.path.join(work, "tokenizer.model")
    _python(os.path.join(TOOLS, "train_tokenizer.py"), "--output", tokenizer)
    data = write_task_files(os.path.join(work, "data"), train=50000, heldout=500)
    report = {}
    for name, arch, iters, stop, min_lr in (
            ("teacher", TEACHER, args.teacher_iters, args.teacher_stop, args.teacher_min_lr),
            ("student", STUDENT, args.student_iters, args.student_stop, args.student_min_lr)):
        start = time.perf_counter()
        checkpoint = sft(arch, name, work, data, tokenizer, iters, stop, args.lr, min_lr,
                         args.seed)
        seconds = time.perf_counter() - start
        hf_dir = os.path.join(args.output_dir, name)
        export(checkpoint, tokenizer, hf_dir)
        result = heldout_pass_at_1(hf_dir, data["heldout"], work)
        report[name] = {"sft_iterations": stop, "schedule_iterations": iters, "batch": 64,
                        "lr": args.lr,
                        "min_lr": min_lr,
                        "train_seconds": round(seconds), "heldout_pass@1": result["pass@1"],
                        "heldout_greedy": result["greedy"], "parameters": _parameters(hf_dir)}
        print(f"[toy] {name}: {stop} SFT iterations in {seconds:.0f} s, held-out pass@1 "
              f"{result['pass@1']:.3f}", flush=True)
    with open(os.path.join(args.output_dir, "models.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
