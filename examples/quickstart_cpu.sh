#!/usr/bin/env bash
# The main job on a CPU machine: set up (idempotent), then a student and a teacher at TP=2 on two
# CPU processes, the student distilled towards the teacher by vocabulary-parallel reverse KL.
# (Until the built-in task and toy models land, this is the foundation's end-to-end smoke run.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
torchrun --nproc-per-node "${NPROC:-2}" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
  -m megatron_tropd.smoke --tensor-model-parallel-size "${TP:-2}" "$@"
