"""Compare a Megatron checkpoint with an HF model on the same random token ids: transformers runs
the HF model, our model builder runs the checkpoint at the TP/PP you give, and the last line printed
is `max_abs_logit_diff=<x> kl=<y> top1_agree=<z>`.

kl is KL(HF || Megatron) per position, averaged. Judge by the first two numbers: top-1 agreement
hides layout bugs (with gate and up swapped the toy teacher still agrees on 7 tokens in 10).

A gate for scripts: the exit status is non-zero, after a one-line `error: ...` on stderr, when the
two configs differ (checked before anything is loaded) or when max_abs_logit_diff exceeds
--max-abs-diff or kl exceeds --max-kl. The defaults depend on the dtype the models run in:
float32 1e-3 and 1e-6, bfloat16/float16 5 and 2e-2 (16-bit rounding alone moves a logit by up to
~2, so there the KL decides). Correct conversions of the toy models measured at most 4e-5 / 2e-12
in float32 and 2.1 / 4e-3 in bfloat16, layout bugs at least 3.2 / 0.15 (docs/CONVERSION.md).

    python tools/compare_hf_megatron.py --hf-dir Qwen3-1.7B --megatron-dir ckpt/student
    torchrun --nproc-per-node 4 tools/compare_hf_megatron.py --hf-dir Qwen3-1.7B \\
        --megatron-dir ckpt/student --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.runtime import cli

# (max |logit difference|, KL) a correct conversion stays under, by the dtype the models run in
# (measured figures in docs/CONVERSION.md).
THRESHOLDS = {"float32": (1e-3, 1e-6), "16-bit": (5.0, 2e-2)}


def _parse_args(argv=None):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--hf-dir", required=True, help="HF model directory")
    parser.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    cli.add_parallel_args(parser, "to run the Megatron model at")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype both models run in (default: the checkpoint's)")
    parser.add_argument("--transformer-engine", action="store_true",
                        help="build the Megatron model with the TransformerEngine layer spec (GPU)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens each (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    (abs32, kl32), (abs16, kl16) = THRESHOLDS["float32"], THRESHOLDS["16-bit"]
    parser.add_argument("--max-abs-diff", type=float, default=None, metavar="X",
                        help=f"fail above this max |logit difference| (default {abs32:g} in "
                             f"float32, {abs16:g} in bfloat16/float16)")
    parser.add_argument("--max-kl", type=float, default=None, metavar="X",
                        help=f"fail above this KL (default {kl32:g} in float32, {kl16:g} in "
                             "bfloat16/float16)")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    import torch
    import torch.distributed as dist

    from megatron_tropd.checkpoint.conversion import DTYPES
    from megatron_tropd.checkpoint.model_dir import load_model, params_dtype, read_metadata
    from megatron_tropd.checkpoint.parity import (ParityError, arch_difference, format_parity,
                                                  forward_logits, hf_logits, logit_parity,
                                                  threshold_error)
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model, check_parallel_layout
    from megatron_tropd.runtime.initialize import first_error, initialize_distributed

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    meta = read_metadata(args.megatron_dir)
    arch = ModelArch.from_file(args.megatron_dir)
    difference = arch_difference(ModelArch.from_file(args.hf_dir), arch)
    if difference:
        raise ParityError(f"--hf-dir {args.hf_dir} and --megatron-dir {args.megatron_dir} differ "
                          "in {} ({!r} vs {!r})".format(*difference))
    check_parallel_layout(arch, tp, pp)
    cli.require_world_size(tp * pp, f"comparing at TP={tp} x PP={pp}")
    dtype = DTYPES[args.dtype] if args.dtype else params_dtype(meta)
    default_abs, default_kl = THRESHOLDS["float32" if dtype == torch.float32 else "16-bit"]
    max_abs = default_abs if args.max_abs_diff is None else args.max_abs_diff
    max_kl = default_kl if args.max_kl is None else args.max_kl
    initialize_distributed(tp, pp)

    model = build_model(arch, "teacher", params_dtype=dtype, perform_initialization=False,
                        use_transformer_engine=args.transformer_engine)
    load_model(args.megatron_dir, model)
    tokens = torch.randint(arch.vocab_size, (args.batch_size, args.seq_length),
                           generator=torch.Generator().manual_seed(args.seed))
    logits = forward_logits(model, tokens, arch.vocab_size)
    error = None
    if dist.get_rank() == dist.get_world_size() - 1:  # the last stage holds the logits
        parity = logit_parity(hf_logits(args.hf_dir, tokens, dtype), logits)
        engine = ", TransformerEngine" if args.transformer_engine else ""
        print(f"tokens {args.batch_size}x{args.seq_length}, {dtype}, TP={tp} PP={pp}{engine}")
        print(format_parity(parity), flush=True)
        error = threshold_error(parity, max_abs, max_kl)
    failure = first_error(error)  # every rank exits with the last rank's verdict
    if failure:
        raise ParityError(failure)


if __name__ == "__main__":
    errors.run_main(main)
