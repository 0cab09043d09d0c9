"""When the trainer stops before `--train-iters`: a SIGTERM or SIGUSR1 (a preemption notice, a
SLURM `--signal`, `kill`), `--exit-duration-in-mins` or `--exit-interval`. Every rank must stop at
the same iteration (a checkpoint save is collective), so the decision is all-reduced each iteration.

A signal only sets a flag: the current iteration finishes, a checkpoint is saved and the process
exits with status 0 and a line saying how to resume. Under torchrun send the signal to the workers,
not to torchrun: torchrun answers SIGTERM by forwarding it, killing the workers 30 s later and
exiting non-zero. SIGUSR1 avoids that: start torchrun with SIGUSR1 ignored (`trap '' USR1` in the
launching shell; the workers install their own handler) and signal every process, as SLURM's
`--signal=USR1@<seconds>` does. A clean early stop leaves `<save>/latest` below `--train-iters`:
that, with exit status 0, is what a requeueing job script tests.
"""

import signal
import time
from typing import Optional

from megatron_tropd.runtime.initialize import all_reduce_max

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopConditions:
    """Watches for the signals while a run trains (a context manager: the previous handlers come
    back on exit) and says, collectively, whether to stop after an iteration."""

    def __init__(self, args):
        self.exit_interval = args.exit_interval
        self.exit_seconds = 60.0 * args.exit_duration_in_mins if args.exit_duration_in_mins else None
        self.start = time.monotonic()
        self.received = 0  # number of the first signal caught
        self._previous = {}

    def __enter__(self):
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if not self.received:
            self.received = signum

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after `iteration` (None: go on). Collective: every rank gets the same
        answer, whichever rank caught the signal or ran out of time first."""
        signum, out_of_time = all_reduce_max([
            self.received,
            self.exit_seconds is not None and time.monotonic() - self.start >= self.exit_seconds])
        if signum:
            return f"{signal.Signals(signum).name} received"
        if out_of_time:
            return f"--exit-duration-in-mins {self.exit_seconds / 60:g} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return "--exit-interval"
        return None
