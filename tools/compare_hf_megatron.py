"""Compare a Megatron checkpoint with an HF model on the same random token ids: transformers runs
the HF model, our model builder runs the checkpoint at the TP/PP you give, and the last line printed
is `max_abs_logit_diff=<x> kl=<y> top1_agree=<z>`.

kl is KL(HF || Megatron) per position, averaged. Judge by the first two numbers: top-1 agreement
survives some layout bugs (a model with gate and up swapped agrees on every top-1 token).

    python tools/compare_hf_megatron.py --hf-dir Qwen3-1.7B --megatron-dir ckpt/student
    torchrun --nproc-per-node 4 tools/compare_hf_megatron.py --hf-dir Qwen3-1.7B \\
        --megatron-dir ckpt/student --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import cli  # noqa: E402


def _parse_args(argv=None):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--hf-dir", required=True, help="HF model directory")
    parser.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel size to run the Megatron model at (default 1)")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, metavar="N",
                        help="pipeline-parallel size (default 1); run on TP x PP processes")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype both models run in (default: the checkpoint's)")
    parser.add_argument("--transformer-engine", action="store_true",
                        help="build the Megatron model with the TransformerEngine layer spec (GPU)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens each (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    import torch
    import torch.distributed as dist

    from megatron_tropd.conversion import DTYPES
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model, check_parallel_layout
    from megatron_tropd.models.checkpoint import load_model, params_dtype, read_metadata
    from megatron_tropd.models.parity import forward_logits, format_parity, hf_logits, logit_parity

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    meta = read_metadata(args.megatron_dir)
    arch = ModelArch.from_file(args.megatron_dir)
    check_parallel_layout(arch, tp, pp)
    cli.require_world_size(tp * pp, f"comparing at TP={tp} x PP={pp}")
    dtype = DTYPES[args.dtype] if args.dtype else params_dtype(meta)
    cli.init_distributed(tp, pp)

    model = build_model(arch, "teacher", params_dtype=dtype, perform_initialization=False,
                        use_transformer_engine=args.transformer_engine)
    load_model(args.megatron_dir, model)
    tokens = torch.randint(arch.vocab_size, (args.batch_size, args.seq_length),
                           generator=torch.Generator().manual_seed(args.seed))
    logits = forward_logits(model, tokens, arch.vocab_size)
    if dist.get_rank() == dist.get_world_size() - 1:  # the last stage holds the logits
        parity = logit_parity(hf_logits(args.hf_dir, tokens, dtype), logits)
        engine = ", TransformerEngine" if args.transformer_engine else ""
        print(f"tokens {args.batch_size}x{args.seq_length}, {dtype}, TP={tp} PP={pp}{engine}")
        print(format_parity(parity), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
