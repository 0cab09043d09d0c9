#!/usr/bin/env bash
# Offline teacher responses for TrOPD's teacher-prefix guidance (TEACHER_RESPONSES of
# examples/distill.sh): tools/generate_teacher_responses.py on TP x PP x DP processes of one node.
#
#   MODEL_CONFIG=Qwen3-8B/config.json WEIGHTS=teacher_global_state_dict.pt TOKENIZER=Qwen3-8B \
#     PROMPTS=prompts.jsonl OUTPUT=teacher_responses.jsonl bash examples/generate_teacher_responses.sh
#
# The tool reads the teacher as a model config and a global (TP=1, PP=1) megatron state dict saved
# with torch.save, and tokenizes text prompts with TOKENIZER without a chat template: the trainer
# finds a response by its prompt's token ids, so train those prompts with --prompt-template plain
# (or give `prompt_ids` in PROMPTS). Environment: MODEL_CONFIG, WEIGHTS, PROMPTS, OUTPUT (required),
# TOKENIZER (HF tokenizer directory, for text prompts), NPROC_PER_NODE (8), TP (2), PP (1),
# MAX_NEW_TOKENS (8192), TEMPERATURE (1.0), SEED (1234), DRY_RUN=1 prints the command. Extra
# arguments go to the tool.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
torchrun_args "${NPROC_PER_NODE:-8}"
TOKENIZER_ARGS=()
[ -n "${TOKENIZER:-}" ] && TOKENIZER_ARGS=(--tokenizer "$TOKENIZER")
launch torchrun "${DISTRIBUTED_ARGS[@]}" "$TOOLS/generate_teacher_responses.py" \
  --model-config "${MODEL_CONFIG:?MODEL_CONFIG=teacher config}" --weights "${WEIGHTS:?WEIGHTS=teacher global state dict}" \
  --prompts "${PROMPTS:?PROMPTS=JSONL of prompts}" --output "${OUTPUT:?OUTPUT=JSONL to write}" "${TOKENIZER_ARGS[@]}" \
  --tp "${TP:-2}" --pp "${PP:-1}" --max-new-tokens "${MAX_NEW_TOKENS:-8192}" \
  --temperature "${TEMPERATURE:-1.0}" --seed "${SEED:-1234}" "$@"
