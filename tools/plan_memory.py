"""Memory per GPU of a distillation run, before asking for GPUs: each component on the busiest
rank, whether it fits and the largest --rollout-batch-size and --max-tokens-per-micro-batch that
do (`megatron_tropd.memory_plan` has what each figure counts).

The models are shipped configs (qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, llama-3-8b), HF
config.json files or model directories; every other flag is the trainer's, as you would pass it
to `python -m megatron_tropd.train` (paths need not exist). The paper's recipe:

    python tools/plan_memory.py --student qwen3-1.7b --teacher qwen3-8b --gpus 8 \\
        --gpu-memory-gib 80 --tensor-model-parallel-size 2 --bf16 --prompts-per-iteration 128 \\
        --samples-per-prompt 4 --prefix-source online --max-prompt-length 512 \\
        --max-new-tokens 8192 --rollout-batch-size 32 --max-tokens-per-micro-batch 17408

Exit status 0 when it fits; otherwise the plan is printed and one line `error: ...` says why,
exit status 2 (as for every other bad input).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import arguments, errors, memory_plan  # noqa: E402
from megatron_tropd.runtime import cli


def main(argv=None):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--student", required=True, help="shipped config name, config.json or "
                        "model directory")
    parser.add_argument("--teacher", required=True, help="likewise, for the teacher")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the run (all nodes)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: a CPU run's extra copies (the decode's packed weights)")
    opt, trainer_flags = parser.parse_known_args(argv)
    if "--train-iters" not in trainer_flags:
        trainer_flags += ["--train-iters", "1"]
    args = arguments.parse_args(trainer_flags)
    arguments.set_micro_batch_default(args)
    config = memory_plan.config_from_args(
        args, memory_plan.load_arch(opt.student), memory_plan.load_arch(opt.teacher), opt.gpus,
        opt.gpu_memory_gib, opt.device)
    print(memory_plan.report(config), flush=True)
    memory_plan.require_fit(config)


if __name__ == "__main__":
    errors.run_main(main)
