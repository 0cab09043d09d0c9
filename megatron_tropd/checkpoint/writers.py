"""megatron-core's checkpoint writer processes, bound to the process that saves.

`dist_checkpointing.save` (torch_dist format) collects its write results through a queue served
by a multiprocessing Manager, a spawned process that lives as long as the saving process, and
megatron-core 0.16 writes its shards in forked processes. Nothing ties them to their parent: after
a SIGKILL of a trainer or a conversion (mid-save, say) they stay alive holding the output. Bound
here, each asks the kernel (Linux `prctl(PR_SET_PDEATHSIG)`) for a SIGKILL when its parent dies.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_bound = False
_parent_pid = None
_manager = None  # kept referenced: the Manager shuts down when collected


def die_with_parent(parent_pid: int):
    """In a child process: SIGKILL when `parent_pid` ends, now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)


def _before_fork():
    global _parent_pid
    _parent_pid = os.getpid()


def bind_writer_processes():
    """From now on, every process this one forks, and the Manager behind megatron-core's write
    results queue, die with it. Call before the first save; idempotent; a no-op off Linux."""
    global _bound, _manager
    if _bound or not sys.platform.startswith("linux"):
        return
    _bound = True
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    os.register_at_fork(before=_before_fork, after_in_child=lambda: die_with_parent(_parent_pid))
    if filesystem_async._results_queue is None:  # what megatron-core would create on first use
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _manager.Queue()
