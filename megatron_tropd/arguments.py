"""Command-line arguments of the trainer, in Megatron-LM-style groups, and one `validate_args`
holding every cross-flag check (each failure is a one-line `ArgumentError`)."""

import argparse
import dataclasses
import math
import os
import sys

from megatron_tropd import data
from megatron_tropd.distill.losses import (METHOD_DEFAULTS, METHODS, OUTLIER_MODES, TRUST_REGIONS,
                                           DistillConfig)
from megatron_tropd.errors import ArgumentParser, UserError


class ArgumentError(UserError):
    """A bad flag or flag combination: one-line message."""


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="python -m megatron_tropd.train",
        description="On-policy distillation (TrOPD and baselines) and SFT on megatron-core. "
                    "Run under torchrun: torchrun --nproc-per-node N -m megatron_tropd.train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for add_group in (_add_model_args, _add_parallel_args, _add_distill_args, _add_rollout_args,
                      _add_training_args, _add_data_args, _add_checkpoint_args, _add_logging_args):
        add_group(parser)
    return parser.parse_args(argv)


def _add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--student-load", help="student checkpoint directory (tools/convert_checkpoint.py "
                   "hf-to-megatron output, or a trainer checkpoint)")
    g.add_argument("--teacher-load", help="teacher checkpoint directory")
    g.add_argument("--student-config", help="build the student randomly initialised from this "
                   "config (HF config.json or our own JSON) instead of --student-load")
    g.add_argument("--teacher-config", help="build the teacher randomly initialised from this "
                   "config instead of --teacher-load (tests)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (GPU)")
    g.add_argument("--transformer-engine", action="store_true",
                   help="TransformerEngine layer spec (needs transformer-engine, GPU)")


def _add_parallel_args(parser):
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimiser state over data-parallel ranks")


def _add_distill_args(parser):
    d = DistillConfig()
    g = parser.add_argument_group("distillation (defaults are the papers')")
    g.add_argument("--mode", choices=("distill", "sft"), default="distill",
                   help="distill: on-policy distillation; sft: next-token cross-entropy on "
                        "prompt+response data through the same loop")
    g.add_argument("--distill-method", dest="method", choices=METHODS, default=d.method)
    g.add_argument("--ppo-clip", type=_float_or_none, default=None,
                   help="PPO ratio clip epsilon of policy-gradient terms; 'none' turns it off "
                        "(default: the method's, 0.2 for eopd, none for the others)")
    g.add_argument("--trust-region", choices=TRUST_REGIONS, default=d.trust_region,
                   help="TrOPD trust test: stochastic acceptance M~Bernoulli(min(1, pi_T/pi_S_old)) "
                        "(the paper); deterministic lp_T-lp_S_old >= log(tau); kl: full-vocabulary "
                        "KL(pi_S||pi_T) <= delta")
    g.add_argument("--trust-tau", type=float, default=d.trust_tau)
    g.add_argument("--trust-kl-delta", type=float, default=d.trust_kl_delta)
    g.add_argument("--outlier-mode", choices=OUTLIER_MODES, default=d.outlier_mode,
                   help="TrOPD untrusted tokens: mask (no loss), clip (advantage max(A, "
                        "log(lambda/(1-lambda)))), fkl (top-k forward KL, the paper)")
    g.add_argument("--fkl-code-faithful", action="store_true",
                   help="outlier fkl as the reported official code: the no-grad top-k FKL value "
                        "becomes the sampled token's advantage (default: supervised top-k FKL)")
    g.add_argument("--topk-renormalize", action="store_true",
                   help="renormalise the teacher's top-k probabilities over the k ids")
    g.add_argument("--clip-lambda", type=float, default=d.clip_lambda)
    g.add_argument("--prefix-beta", type=float, default=d.prefix_beta,
                   help="weight of the beta*CE imitation term on teacher-prefix tokens")
    g.add_argument("--eopd-entropy-threshold", type=float, default=d.eopd_entropy_threshold)
    g.add_argument("--eopd-topk", type=int, default=d.eopd_topk)
    g.add_argument("--reopold-fraction", type=float, default=d.reopold_fraction,
                   help="REOPOLD trains on this fraction of the tokens, those of highest student "
                        "entropy (reopold-2stage: from --reopold-stage2-step on)")
    g.add_argument("--reopold-stage2-step", type=int, default=d.reopold_stage2_step,
                   help="reopold-2stage: before this step every token whose reward is above the "
                        "clip floor is trained on (exploration), from it the entropy selection")
    g.add_argument("--entropy-opd-fraction", type=float, default=d.entropy_opd_fraction)
    g.add_argument("--jsd-beta", type=float, default=d.jsd_beta,
                   help="GKD generalised JSD beta (0 forward KL, 1 reverse KL)")
    g.add_argument("--importance-ratio-cap", type=float, default=None,
                   help="truncate the importance ratio exp(lp_S - lp_S_old) of the policy-"
                        "gradient terms at this value (token-level truncated IS; >= 1); off if "
                        "unset")


def _add_rollout_args(parser):
    g = parser.add_argument_group("rollout and teacher scoring")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="on-policy samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k truncation")
    g.add_argument("--stop-ids", type=int, nargs="*", default=None,
                   help="token ids that end a response (the tokenizer's EOS is always one)")
    g.add_argument("--recompute-old-logprobs", choices=("auto", "on", "off"), default="auto",
                   help="recompute lp_S_old with a forward-only pass of the training model "
                        "before the update, so the first ratio is exactly 1 (the decode path "
                        "rounds differently in bf16 and with TransformerEngine); auto: on with "
                        "--bf16 or --transformer-engine")
    g.add_argument("--rollout-batch-size", type=int, default=64,
                   help="rows decoded at once per rank (the KV cache holds this many): a row that "
                        "ends frees its slot for the next (continuous batching)")
    g.add_argument("--teacher-topk", type=int, default=64,
                   help="k of the teacher's top-k signals (FKL terms)")
    g.add_argument("--prefix-source", choices=("none", "offline", "online"), default="none",
                   help="teacher responses for TrOPD's off-policy guidance: none, a JSONL file "
                        "(--teacher-responses), or generated by the teacher in the job. The "
                        "paper's full TrOPD is --distill-method tropd with guidance on: "
                        "--prefix-source online")
    g.add_argument("--teacher-responses",
                   help="JSONL as tools/generate_teacher_responses.py writes it, one "
                        "{\"prompt_ids\": [...], \"response_ids\": [...]} per line, looked up "
                        "by prompt ids (the format: data.load_teacher_responses)")
    g.add_argument("--prefix-anneal-steps", type=int, default=200,
                   help="T of alpha(step) = (1 + cos(pi * step / T)) / 2")
    g.add_argument("--prefix-samples-per-prompt", type=int, default=1,
                   help="extra teacher-prefix samples per prompt beside the on-policy ones")


def _add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--prompts-per-iteration", type=int, default=8,
                   help="global batch of prompts per iteration (all data-parallel ranks)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="most rows per micro-batch (teacher scoring and the update; default 4, "
                        "or no row limit with --max-tokens-per-micro-batch)")
    g.add_argument("--max-tokens-per-micro-batch", type=int, default=None,
                   help="most tokens per micro-batch, padding included (rows x its longest row; "
                        "rows are grouped by length); also bounds one prefill forward of the "
                        "rollout. Memory per rank follows this, not the batch")
    g.add_argument("--lr", type=float, default=5e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--epochs-per-rollout", type=int, default=1,
                   help="optimiser steps per rollout batch (PPO-style epochs)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="an optimiser step whose loss or gradients hold NaN/Inf is skipped (no "
                        "weight, Adam or LR-schedule change) with a warning; this many in a row "
                        "stop the run with an error (1: stop at the first)")


def _add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--prompts", help="prompts: .jsonl, .json, .parquet or a datasets "
                   "save_to_disk directory (a prompt or messages column, optional answer)")
    g.add_argument("--sft-data", help="the same with a response column, for --mode sft")
    add_data_args(g)
    g.add_argument("--max-prompt-length", type=int, default=512)
    g.add_argument("--verifier", help="log the pass rate of the student's rollouts per "
                   "iteration, checked by this verifier (addition, math, exact or "
                   "module:function) against the prompts' answers; also checks --eval-data")
    g.add_argument("--eval-data", help="held-out prompts with answers: the student's greedy "
                   "pass@1 on them every --eval-interval iterations (TensorBoard eval/)")
    g.add_argument("--eval-interval", type=int, default=0,
                   help="iterations between held-out evaluations, and one before the first "
                        "(0: never)")
    g.add_argument("--eval-limit", type=int, default=0, help="first N --eval-data prompts (0: all)")


def add_data_args(group):
    """How prompt files are read and rendered: the trainer's and `evaluate`'s flags."""
    group.add_argument("--tokenizer", help="SentencePiece .model file or HF tokenizer directory "
                       "(default: the checkpoint directory's)")
    group.add_argument("--prompt-template", choices=("auto", "chat", "plain"), default="auto",
                       help="chat: the tokenizer's chat template; plain: 'Role: content' lines; "
                            "auto: chat when the tokenizer has a template")
    group.add_argument("--chat-template-file",
                       help="a Jinja chat template replacing the tokenizer's (HF tokenizers)")
    data.add_column_args(group)


def _add_checkpoint_args(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", help="directory for checkpoints (iter_XXXXXXX/ and latest)")
    g.add_argument("--save-interval", type=int, default=0, help="0: only at the end")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--load", help="resume from the latest checkpoint here (default: --save)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume the model weights only (fresh optimiser and scheduler)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, the LR-schedule flags of this command line (--lr, --min-lr, "
                        "--lr-warmup-iters, --lr-decay-style, --weight-decay) replace the "
                        "checkpoint's (default, as --use-checkpoint-opt-param-scheduler in "
                        "Megatron-LM: the checkpoint's are kept). Either way a resume names each "
                        "flag that differs; --train-iters always re-plans the decay")
    g.add_argument("--exit-interval", type=int, default=0,
                   help="save a checkpoint and exit when the iteration is a multiple of this "
                        "(0: never); a later run with the same --save resumes")
    g.add_argument("--exit-duration-in-mins", type=float, default=0.0,
                   help="save a checkpoint and exit after the first iteration that ends this many "
                        "minutes after start-up (0: never). SIGTERM and SIGUSR1 do the same at "
                        "the end of the current iteration. These stops exit with status 0 and "
                        "leave <save>/latest below --train-iters; the same command resumes "
                        "(docs/RELIABILITY.md)")


def _add_logging_args(parser):
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", help="TensorBoard event files (default: <save>/tensorboard)")
    g.add_argument("--verbose", action="store_true",
                   help="show every library warning (megatron-core, torch, transformers); by "
                        "default the known-harmless ones are filtered (also TROPD_VERBOSE=1)")


def _float_or_none(text: str):
    return NO_VALUE if text.lower() == "none" else float(text)


NO_VALUE = "none"  # a flag given as 'none': off, whatever the method's default


def distill_config(args) -> DistillConfig:
    """The loss hyper-parameters: the DistillConfig fields share the flags' names; a flag left
    unset (None) takes the method's default (`losses.METHOD_DEFAULTS`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)}
    for name, value in METHOD_DEFAULTS.get(args.method, {}).items():
        if values[name] is None:
            values[name] = value
    return DistillConfig(**{k: None if v == NO_VALUE else v for k, v in values.items()})


def validate_args(args, world_size: int = 1):
    """Every cross-flag check, before anything is built. Raises a one-line ArgumentError."""
    _check_finite(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ArgumentError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by tensor-model-parallel size "
                            f"{tp} x pipeline-model-parallel size {pp}")
    dp = world_size // (tp * pp)
    if bool(args.student_load) == bool(args.student_config):
        raise ArgumentError("give exactly one of --student-load and --student-config")
    if args.mode == "distill" and bool(args.teacher_load) == bool(args.teacher_config):
        raise ArgumentError("give exactly one of --teacher-load and --teacher-config")
    if args.mode == "distill" and not args.prompts:
        raise ArgumentError("--mode distill needs --prompts")
    if args.mode == "sft" and not args.sft_data:
        raise ArgumentError("--mode sft needs --sft-data")
    for name in ("prompts", "sft_data", "teacher_responses", "tokenizer", "student_load",
                 "teacher_load", "student_config", "teacher_config", "chat_template_file",
                 "eval_data"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            raise ArgumentError(f"--{name.replace('_', '-')} {path} does not exist")
    if args.train_iters < 1:
        raise ArgumentError("--train-iters must be >= 1")
    if args.prompts_per_iteration % dp:
        raise ArgumentError(f"--prompts-per-iteration {args.prompts_per_iteration} is not divisible "
                            f"by the data-parallel size {dp}")
    set_micro_batch_default(args)
    for name in ("micro_batch_size", "samples_per_prompt", "epochs_per_rollout",
                 "rollout_batch_size", "max_new_tokens", "max_prompt_length",
                 "max_tokens_per_micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    longest_row = args.max_prompt_length + args.max_new_tokens
    if args.max_tokens_per_micro_batch is not None and args.max_tokens_per_micro_batch < longest_row:
        raise ArgumentError(f"--max-tokens-per-micro-batch {args.max_tokens_per_micro_batch} is "
                            f"below one row of --max-prompt-length + --max-new-tokens = "
                            f"{longest_row} tokens")
    if args.temperature <= 0:
        raise ArgumentError("--temperature must be > 0 for on-policy sampling (log-probs of the "
                            "sampler are needed)")
    from megatron_tropd.rollout.generate import GenerationError, check_sampling

    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except GenerationError as e:
        raise ArgumentError(f"sampling flags --temperature / --top-k / --top-p: {e}") from None
    if not 0.0 < args.clip_lambda < 1.0:
        raise ArgumentError("--clip-lambda must be in (0, 1)")
    if not 0.0 <= args.jsd_beta <= 1.0:
        raise ArgumentError("--jsd-beta must be in [0, 1]")
    if args.ppo_clip not in (None, NO_VALUE) and not 0.0 < args.ppo_clip < 1.0:
        raise ArgumentError("--ppo-clip must be in (0, 1) or none")
    if args.importance_ratio_cap is not None and not args.importance_ratio_cap >= 1.0:
        raise ArgumentError("--importance-ratio-cap must be >= 1 (the on-policy ratio is 1)")
    for name in ("reopold_fraction", "entropy_opd_fraction"):
        if not 0.0 < getattr(args, name) <= 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if args.teacher_topk < 1 or args.eopd_topk < 1:
        raise ArgumentError("--teacher-topk and --eopd-topk must be >= 1")
    if args.method == "eopd" and args.eopd_topk > args.teacher_topk:
        raise ArgumentError(f"--eopd-topk {args.eopd_topk} exceeds --teacher-topk {args.teacher_topk}")
    if args.prefix_source != "none" and args.method != "tropd":
        raise ArgumentError("--prefix-source (teacher-prefix guidance) is part of --distill-method "
                            "tropd only")
    if args.prefix_source == "offline" and not args.teacher_responses:
        raise ArgumentError("--prefix-source offline needs --teacher-responses")
    if args.prefix_anneal_steps < 1:
        raise ArgumentError("--prefix-anneal-steps must be >= 1")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ArgumentError("learning rates must satisfy 0 <= --min-lr <= --lr")
    for name in ("weight_decay", "clip_grad", "prefix_beta", "eopd_entropy_threshold"):
        if getattr(args, name) < 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1), got "
                                f"{getattr(args, name)}")
    if args.trust_tau <= 0 or args.trust_kl_delta <= 0:
        raise ArgumentError("--trust-tau and --trust-kl-delta must be > 0")
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.train_iters:
        raise ArgumentError("--lr-warmup-iters must be in [0, --train-iters]")
    if (args.save_interval < 0 or args.keep_last < 0 or args.exit_interval < 0
            or args.exit_duration_in_mins < 0 or args.log_interval < 1):
        raise ArgumentError("--save-interval, --keep-last, --exit-interval and "
                            "--exit-duration-in-mins must be >= 0, --log-interval >= 1")
    if args.max_nonfinite_steps < 1:
        raise ArgumentError("--max-nonfinite-steps must be >= 1")
    if bool(args.eval_data) != bool(args.eval_interval > 0) or args.eval_interval < 0:
        raise ArgumentError("--eval-data and --eval-interval (>= 1) go together")
    if args.eval_data and not args.verifier:
        raise ArgumentError("--eval-data needs --verifier, to check the responses")
    if args.eval_limit < 0:
        raise ArgumentError("--eval-limit must be >= 0")
    if args.verifier:
        from megatron_tropd.tasks.verifiers import VerifierError, get_verifier

        try:
            get_verifier(args.verifier)
        except VerifierError as e:
            raise ArgumentError(f"--verifier: {e}") from None
    if args.bf16 and not _cuda_available():
        raise ArgumentError("--bf16 needs a GPU (CPU runs are fp32)")
    _warn_about_sampling(args)
    return dp


def _check_finite(args):
    """Every float flag a finite number: NaN passes every `<` / `<=` range check after it, and
    an infinite --lr or --temperature would run and turn the weights to NaN."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


# Methods whose loss reads lp_S_old as the probability of the sampled token (ratio, trust test).
RATIO_METHODS = ("opd", "tropd", "eopd", "reopold", "reopold-2stage", "entropy-opd")


def _warn_about_sampling(args):
    """One line on stderr (rank 0) when the sampler is not the student's own distribution."""
    changed = [f"--{flag.replace('_', '-')} {getattr(args, flag)}"
               for flag, plain in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
               if getattr(args, flag) != plain]
    if args.mode == "distill" and args.method in RATIO_METHODS and changed and \
            os.environ.get("RANK", "0") == "0":
        print(f"warning: {', '.join(changed)}: samples no longer come from the distribution "
              f"lp_S_old describes (the untempered, untruncated student), so the importance "
              f"ratio and TrOPD's trust test (the speculative-decoding acceptance test) are off "
              f"by that difference", file=sys.stderr, flush=True)


def prefix_rows(args) -> int:
    """Teacher-prefix rows per prompt on top of the samples (0 without guidance)."""
    return args.prefix_samples_per_prompt if args.prefix_source != "none" else 0


def recomputes_old_logprobs(args) -> bool:
    """Whether lp_S_old is recomputed by the training model before the update."""
    if args.recompute_old_logprobs == "auto":
        return args.bf16 or args.transformer_engine
    return args.recompute_old_logprobs == "on"


def set_micro_batch_default(args):
    """Without --micro-batch-size: 4 rows per micro-batch, or no row limit (None) when
    --max-tokens-per-micro-batch sizes them."""
    if args.micro_batch_size is None and args.max_tokens_per_micro_batch is None:
        args.micro_batch_size = 4


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
