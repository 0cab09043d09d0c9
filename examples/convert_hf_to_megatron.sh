#!/usr/bin/env bash
# HF model directory -> Megatron checkpoint at the TP/PP layout you train with (it reshards on load
# too), on TP x PP processes of one node (docs/CONVERSION.md).
#
#   HF_DIR=Qwen3-8B OUTPUT_DIR=ckpt/teacher TP=2 bash examples/convert_hf_to_megatron.sh
#
# Environment: HF_DIR, OUTPUT_DIR (required), TP (2), PP (1), DTYPE (bfloat16; float32 for CPU
# runs), DRY_RUN=1 prints the command. Extra arguments (e.g. --overwrite) go to the tool.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TP=${TP:-2}
PP=${PP:-1}
torchrun_args $((TP * PP))
launch torchrun "${DISTRIBUTED_ARGS[@]}" "$TOOLS/convert_checkpoint.py" hf-to-megatron \
  --hf-dir "${HF_DIR:?HF_DIR=HF model directory}" --output-dir "${OUTPUT_DIR:?OUTPUT_DIR=Megatron checkpoint to write}" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --dtype "${DTYPE:-bfloat16}" "$@"
