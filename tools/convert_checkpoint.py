"""Convert checkpoints between HF model directories and Megatron checkpoints.

A Megatron checkpoint here is a directory with the HF config.json and tokenizer files, a small
megatron_tropd.json and the weights as a megatron-core dist_checkpointing (reshardable: it loads at
any TP/PP). Supported families: Llama (incl. Llama-3 RoPE scaling), Qwen2, Qwen3, Mistral.

HF -> Megatron, one process per model-parallel rank of the layout you will train with:
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Qwen3-1.7B --output-dir ckpt/student
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-megatron --hf-dir Qwen3-8B \\
        --output-dir ckpt/teacher --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Megatron -> HF, one process (the checkpoint may have been saved at any TP/PP, by this tool or by
the trainer):
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir ckpt/student/iter_0001000 \\
        --output-dir student-hf --dtype bfloat16
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.runtime import cli


def _parse_args(argv=None):
    parser = cli.argument_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{hf-to-megatron,megatron-to-hf}")

    to_mcore = sub.add_parser(
        "hf-to-megatron", help="HF model directory -> Megatron checkpoint at a chosen TP/PP",
        description="Convert an HF model directory (config.json, model.safetensors or an index of "
                    "shards, tokenizer files) into a Megatron checkpoint. Run it on TP x PP "
                    "processes (torchrun --nproc-per-node TP*PP); each reads only its own part.")
    to_mcore.add_argument("--hf-dir", required=True, help="HF model directory to read")
    to_mcore.add_argument("--output-dir", required=True,
                          help="Megatron checkpoint directory to write")
    cli.add_parallel_args(to_mcore, "to convert at")
    to_mcore.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                          help="dtype of the Megatron weights (default float32)")
    to_mcore.add_argument("--overwrite", action="store_true",
                          help="replace --output-dir if it exists and is not empty")

    to_hf = sub.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (any TP/PP) -> HF model directory",
        description="Export a Megatron checkpoint as an HF model directory that "
                    "transformers.AutoModelForCausalLM.from_pretrained loads. One process.")
    to_hf.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory to read")
    to_hf.add_argument("--output-dir", required=True, help="HF model directory to write")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="dtype of the HF weights (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=2.0,
                       help="largest safetensors file to write, in GiB (default 2)")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="replace --output-dir if it exists and is not empty")
    for command in (to_mcore, to_hf):
        command.add_argument("--verbose", action="store_true",
                             help="show every library warning; by default the known-harmless ones "
                                  "are filtered (megatron_tropd/runtime/console.py; also TROPD_VERBOSE=1)")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    from megatron_tropd.runtime import console

    console.configure(args.verbose)
    # Input checks first: they need neither a process group nor megatron-core.
    from megatron_tropd.checkpoint import conversion
    from megatron_tropd.checkpoint.model_dir import check_output_dir, read_metadata
    from megatron_tropd.runtime.initialize import initialize_distributed, print_rank_0

    check_output_dir(args.output_dir, args.overwrite)
    if args.command == "hf-to-megatron":
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        conversion.open_hf_model(args.hf_dir, tp, pp)
        cli.require_world_size(tp * pp, f"hf-to-megatron at TP={tp} x PP={pp}")
        initialize_distributed(tp, pp)
        conversion.hf_to_megatron(args.hf_dir, args.output_dir, conversion.DTYPES[args.dtype],
                                  args.overwrite)
    else:
        read_metadata(args.megatron_dir)
        cli.require_world_size(1, "megatron-to-hf")
        initialize_distributed()
        conversion.megatron_to_hf(args.megatron_dir, args.output_dir,
                                  conversion.DTYPES.get(args.dtype), args.overwrite,
                                  int(args.max_shard_size_gb * 1024**3))
    print_rank_0(f"wrote {args.output_dir}")


if __name__ == "__main__":
    errors.run_main(main)
