#!/usr/bin/env bash
# Offline teacher responses for TrOPD's teacher-prefix guidance (TEACHER_RESPONSES of
# examples/distill.sh): tools/generate_teacher_responses.py on TP x PP x DP processes of one node.
#
#   TEACHER=ckpt/teacher PROMPTS=prompts.jsonl OUTPUT=teacher_responses.jsonl \
#     bash examples/generate_teacher_responses.sh --prompt-template plain
#
# The tool loads the teacher (a Megatron checkpoint or HF model directory) as evaluate does, and
# tokenizes text prompts exactly as the trainer does with the same --tokenizer / --prompt-template /
# column flags (pass the ones the training run uses), since the trainer finds a response by its
# prompt's token ids. Environment: TEACHER, PROMPTS, OUTPUT (required), TOKENIZER (default: the
# teacher's), NPROC_PER_NODE (8), TP (2), PP (1), MAX_NEW_TOKENS (8192), TEMPERATURE (1.0),
# SEED (1234), DRY_RUN=1 prints the command. Extra arguments go to the tool.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
torchrun_args "${NPROC_PER_NODE:-8}"
TOKENIZER_ARGS=()
[ -n "${TOKENIZER:-}" ] && TOKENIZER_ARGS=(--tokenizer "$TOKENIZER")
launch torchrun "${DISTRIBUTED_ARGS[@]}" "$TOOLS/generate_teacher_responses.py" \
  --load "${TEACHER:?TEACHER=Megatron checkpoint or HF directory of the teacher}" \
  --prompts "${PROMPTS:?PROMPTS=JSONL of prompts}" --output "${OUTPUT:?OUTPUT=JSONL to write}" "${TOKENIZER_ARGS[@]}" \
  --tp "${TP:-2}" --pp "${PP:-1}" --max-new-tokens "${MAX_NEW_TOKENS:-8192}" \
  --temperature "${TEMPERATURE:-1.0}" --seed "${SEED:-1234}" "$@"
