# What the launchers in examples/ share; sourced, not run.
#
#   launch CMD...      runs CMD, or with DRY_RUN=1 prints it (one line, shell-quoted) instead, so
#                      the constructed command can be read or checked (tests/test_launchers.py);
#                      `launch exec CMD...` replaces the shell, so that signals reach CMD
#   torchrun_args N    sets DISTRIBUTED_ARGS for N processes per node: one node (--standalone), or
#                      NNODES nodes meeting at RDZV_ENDPOINT (c10d rendezvous, this node NODE_RANK,
#                      by default SLURM_NODEID); GRACEFUL_SHUTDOWN_S makes torchrun forward SIGUSR1
#                      too and give the workers that long to checkpoint before it kills them

TOOLS=$(dirname "${BASH_SOURCE[0]}")/../tools

launch() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    if [ "$1" = exec ]; then shift; fi
    local line
    line=$(printf '%q ' "$@")
    echo "${line% }"
  else
    "$@"
  fi
}

torchrun_args() {
  local nproc=$1 nnodes=${NNODES:-1}
  if [ "$nnodes" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    DISTRIBUTED_ARGS=(--standalone --nproc-per-node "$nproc")
  else
    : "${RDZV_ENDPOINT:?RDZV_ENDPOINT=host:port of the first node is needed with NNODES=$nnodes}"
    DISTRIBUTED_ARGS=(--nnodes "$nnodes" --node-rank "${NODE_RANK:-${SLURM_NODEID:-0}}"
                      --nproc-per-node "$nproc" --rdzv-backend c10d
                      --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-megatron-tropd}")
  fi
  if [ -n "${GRACEFUL_SHUTDOWN_S:-}" ]; then
    DISTRIBUTED_ARGS+=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
                       --shutdown-timeout "$GRACEFUL_SHUTDOWN_S")
  fi
}
