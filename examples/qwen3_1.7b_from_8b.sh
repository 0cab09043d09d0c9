#!/usr/bin/env bash
# The paper's setting on one node of 8 GPUs: Qwen3-1.7B (student) distilled from Qwen3-8B (teacher)
# with TrOPD, or a baseline with METHOD=opd|eopd|reopold|jsd: HF -> Megatron at TP=2 (bf16), 200
# steps of examples/distill.sh with its paper defaults (bf16, TransformerEngine spec), and the last
# checkpoint exported to HF. Both models share Qwen3's 151,936-token vocabulary.
#
#   HF_STUDENT=/models/Qwen3-1.7B HF_TEACHER=/models/Qwen3-8B PROMPTS=math.jsonl \
#     bash examples/qwen3_1.7b_from_8b.sh
#   DRY_RUN=1 ... bash examples/qwen3_1.7b_from_8b.sh      # print the commands instead
#
# Environment: HF_STUDENT, HF_TEACHER (HF model directories), PROMPTS (JSONL of {prompt} or
# {messages}), WORK (runs/qwen3-1.7b-from-8b: converted models, the run, the export), METHOD
# (tropd), TP (2), and every override of examples/distill.sh (NNODES, TRAIN_ITERS, ...).
# Memory on 8 x 80 GB (tools/plan_memory.py, docs/PERFORMANCE.md): 32 rows in flight per GPU and
# micro-batches of 18432 tokens (distill.sh's defaults) plan at 49.7 GiB per GPU with the
# distributed optimizer, 160 rows of up to 17408 tokens per rank (guided rows: prompt, teacher
# prefix and continuation); the largest that fit are 66 rows and 35264 tokens.
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")
WORK=${WORK:-runs/qwen3-1.7b-from-8b}
export METHOD=${METHOD:-tropd} TP=${TP:-2} TRAIN_ITERS=${TRAIN_ITERS:-200}
export STUDENT=$WORK/student TEACHER=$WORK/teacher SAVE=$WORK/$METHOD

for role in student teacher; do
  hf=HF_${role^^}
  if [ ! -e "$WORK/$role/megatron_tropd.json" ]; then
    HF_DIR=${!hf:?$hf=HF model directory of the $role} OUTPUT_DIR=$WORK/$role \
      bash "$HERE/convert_hf_to_megatron.sh"
  fi
done
bash "$HERE/distill.sh"
MEGATRON_DIR=$(printf "%s/iter_%07d" "$SAVE" "$TRAIN_ITERS") OUTPUT_DIR=$WORK/$METHOD-hf \
  bash "$HERE/convert_megatron_to_hf.sh"
