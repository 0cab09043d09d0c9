#!/usr/bin/env bash
# Megatron checkpoint (a converted model or a trainer checkpoint, saved at any TP/PP) -> HF model
# directory that transformers loads; one process.
#
#   MEGATRON_DIR=runs/tropd/iter_0000200 OUTPUT_DIR=student-tropd-hf bash examples/convert_megatron_to_hf.sh
#
# Environment: MEGATRON_DIR, OUTPUT_DIR (required), DTYPE (bfloat16), DRY_RUN=1 prints the command.
# Extra arguments (e.g. --overwrite, --max-shard-size-gb 5) go to the tool.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
launch python "$TOOLS/convert_checkpoint.py" megatron-to-hf \
  --megatron-dir "${MEGATRON_DIR:?MEGATRON_DIR=Megatron checkpoint to read}" \
  --output-dir "${OUTPUT_DIR:?OUTPUT_DIR=HF model directory to write}" --dtype "${DTYPE:-bfloat16}" "$@"
