#!/usr/bin/env bash
# Idempotent environment set-up: a virtual environment in $VENV (default .venv) holding torch and
# megatron-tropd (editable) with the dev extra. Re-running it does nothing once installed.
#
# torch: a host that already has torch keeps it (the venv sees the system site-packages); otherwise
# torch==$TORCH_VERSION (default 2.13.0, a CPU wheel on CPU hosts) is installed *before* the
# package, so that the package's plain `torch` requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[setup] torch found on the host: creating $VENV with system site-packages to keep it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.megatron_tropd_setup"
want="$(sha1sum setup.py | cut -d' ' -f1) extras=$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  fi
  echo "[setup] installing megatron-tropd[$EXTRAS] (megatron-core, transformers, ...)"
  python -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
