#!/usr/bin/env bash
# On-policy distillation with torchrun, one node or several: the base launcher every method uses.
# Defaults are the paper's setting (docs/METHODS.md): 200 steps, lr 5e-6 without warm-up, weight
# decay 0.1, 128 prompts x 4 rollouts, responses up to 8k tokens, temperature 1.0, teacher top-k 64,
# prefix beta 0.001, grad clip 1.0; 8 GPUs at TP=2, bf16, TransformerEngine layer spec.
#
#   STUDENT=ckpt/student TEACHER=ckpt/teacher PROMPTS=prompts.jsonl bash examples/distill.sh
#   METHOD=opd ... bash examples/distill.sh          # a baseline: opd eopd reopold reopold-2stage jsd
#                                                    # fkl entropy-opd
#   DRY_RUN=1 ... bash examples/distill.sh           # print the torchrun command instead
#
# STUDENT and TEACHER are Megatron checkpoints (examples/convert_hf_to_megatron.sh). Environment
# overrides: METHOD (tropd), SAVE (runs/$METHOD; resumes from its latest checkpoint),
# NPROC_PER_NODE (8), NNODES (1; with more, RDZV_ENDPOINT=host:port of the first node, NODE_RANK),
# TP (2), PP (1), TRAIN_ITERS (200), LR (5e-6), PROMPTS_PER_ITERATION (128), SAMPLES_PER_PROMPT (4),
# MAX_NEW_TOKENS (8192), MAX_PROMPT_LENGTH (1024), ROLLOUT_BATCH_SIZE (32 rows decoded at once),
# MAX_TOKENS_PER_MICRO_BATCH (18432: two full rows; memory per GPU follows these two, see
# tools/plan_memory.py), MICRO_BATCH_SIZE (unset: rows per micro-batch by tokens), TEACHER_TOPK (64),
# SAVE_INTERVAL (20), SEED (1234), BF16 (1), TE (1, TransformerEngine spec), TEACHER_RESPONSES
# (TrOPD: offline teacher responses, examples/generate_teacher_responses.sh; without it
# PREFIX_SOURCE, default online, generates them in the job; none turns guidance off), VERIFIER
# (unset; e.g. math: log the rollouts' pass rate against the prompts' answers).
# Extra arguments go to `python -m megatron_tropd.train` (see its --help) after these and win.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

METHOD=${METHOD:-tropd}
TRAIN_ITERS=${TRAIN_ITERS:-200}

torchrun_args "${NPROC_PER_NODE:-8}"

MODEL_ARGS=(--student-load "${STUDENT:?STUDENT=Megatron checkpoint of the student}"
            --teacher-load "${TEACHER:?TEACHER=Megatron checkpoint of the teacher}")
[ "${BF16:-1}" = 1 ] && MODEL_ARGS+=(--bf16)
[ "${TE:-1}" = 1 ] && MODEL_ARGS+=(--transformer-engine)

MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-2}" --pipeline-model-parallel-size "${PP:-1}"
                     --use-distributed-optimizer)

# What each method sets beyond `--distill-method` (the papers' values); the rest is shared.
case $METHOD in
  tropd)  # stochastic trust test, top-k forward KL on outliers, annealed teacher-prefix guidance
    METHOD_ARGS=(--trust-region stochastic --outlier-mode fkl --prefix-beta 0.001
                 --prefix-anneal-steps "$TRAIN_ITERS")
    if [ -n "${TEACHER_RESPONSES:-}" ]; then
      METHOD_ARGS+=(--prefix-source offline --teacher-responses "$TEACHER_RESPONSES")
    else
      METHOD_ARGS+=(--prefix-source "${PREFIX_SOURCE:-online}")
    fi ;;
  eopd) METHOD_ARGS=(--ppo-clip 0.2 --eopd-entropy-threshold 0.8 --eopd-topk 16) ;;
  reopold) METHOD_ARGS=(--reopold-fraction 0.5) ;;
  reopold-2stage) METHOD_ARGS=(--reopold-fraction 0.5 --reopold-stage2-step $((TRAIN_ITERS / 2))) ;;
  jsd) METHOD_ARGS=(--jsd-beta 0.5) ;;
  *) METHOD_ARGS=() ;;  # opd, fkl, entropy-opd: nothing beyond the defaults; others: the trainer says
esac
DISTILL_ARGS=(--distill-method "$METHOD" "${METHOD_ARGS[@]}")

ROLLOUT_ARGS=(--samples-per-prompt "${SAMPLES_PER_PROMPT:-4}" --max-new-tokens "${MAX_NEW_TOKENS:-8192}"
              --temperature 1.0 --top-p 1.0 --teacher-topk "${TEACHER_TOPK:-64}"
              --rollout-batch-size "${ROLLOUT_BATCH_SIZE:-32}")

TRAINING_ARGS=(--train-iters "$TRAIN_ITERS" --prompts-per-iteration "${PROMPTS_PER_ITERATION:-128}"
               --max-tokens-per-micro-batch "${MAX_TOKENS_PER_MICRO_BATCH:-18432}"
               --lr "${LR:-5e-6}" --lr-warmup-iters 0
               --lr-decay-style constant --weight-decay 0.1 --clip-grad 1.0 --seed "${SEED:-1234}")
[ -n "${MICRO_BATCH_SIZE:-}" ] && TRAINING_ARGS+=(--micro-batch-size "$MICRO_BATCH_SIZE")

DATA_ARGS=(--prompts "${PROMPTS:?PROMPTS=prompts file (.jsonl, .parquet, ...)}" --prompt-template auto
           --max-prompt-length "${MAX_PROMPT_LENGTH:-1024}")
[ -n "${VERIFIER:-}" ] && DATA_ARGS+=(--verifier "$VERIFIER")

CHECKPOINT_ARGS=(--save "${SAVE:-runs/$METHOD}" --save-interval "${SAVE_INTERVAL:-20}")

LOGGING_ARGS=(--log-interval 1)

launch exec torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_tropd.train \
  "${MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DISTILL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
