#!/usr/bin/env bash
# CI stage: a fast subset of the tests against megatron-core 0.19.x, the version users on Python
# 3.12 clusters get, in a venv of its own ($VENV, default .venv-mcore019) on this Python 3.11 host.
# 0.17+ declare Requires-Python >=3.12 but ship cp311 wheels that import on 3.11, so megatron-core
# is installed with --no-deps --ignore-requires-python; its pipeline schedules import triton (not
# needed on CPU, only imported), added by hand. Idempotent: a stamp file records what is installed.
#
#   bash tests/run_mcore019.sh            # the subset
#   bash tests/run_mcore019.sh -k losses  # pytest flags pass through
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-mcore019}
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRITON_VERSION=${TRITON_VERSION:-3.8.0}

[ -x "$VENV/bin/python" ] || { echo "[mcore019] creating $VENV"; "${PYTHON:-python3}" -m venv "$VENV"; }
PY="$VENV/bin/python"
stamp="$VENV/.megatron_tropd_setup"
want="$(cat setup.py "$0" | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[mcore019] installing torch==$TORCH_VERSION, megatron-core==$MCORE_VERSION, triton==$TRITON_VERSION"
  # torch first, so that nothing below pulls a CUDA build of it
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  "$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"
  # megatron-core's own requirements, triton, and this package with its other requirements
  # (megatron-core>=0.16.1 is met by the one installed above, so pip keeps it)
  "$PY" -m pip install -q numpy "packaging>=24.2" "triton==$TRITON_VERSION" -e ".[dev]"
  echo "$want" > "$stamp"
fi
"$PY" -c "from importlib.metadata import version; v = version('megatron-core'); \
assert v == '$MCORE_VERSION', v; print('[mcore019] megatron-core', v)"
# The subset, chosen for a few minutes: the losses against float64 references, the CPU
# compatibility layer (megatron internals it patches), and the trainer end to end through torchrun
# as two nodes (models, rollout with the KV cache, teacher scoring, schedules, DDP, distributed
# optimizer, checkpoint save); resume (its optimiser parameter groups are matched by their LR
# fields in 0.19), the --save lock and the checkpoint writer processes (megatron internals).
# tests/test_{vocab_parallel,models,rollout}.py pass there too but take several more minutes.
exec "$PY" -m pytest -p no:cacheprovider tests/test_losses.py tests/test_runtime.py \
  tests/test_multinode.py "tests/test_training.py::test_resume_is_bit_exact_at_tp2" \
  "tests/test_training.py::test_resume_at_another_layout_continues" \
  "tests/test_reliability.py::test_concurrent_runs" \
  "tests/test_reliability.py::test_writer_processes_die_with_their_parent" "$@"
