"""Run a function in N spawned processes on gloo over 127.0.0.1, so multi-process tests read like
unit tests (after OLMo-core's `run_distributed_test`).

    def check(tp):                       # runs on every rank, megatron groups initialised
        ...
    values = run_distributed(check, world_size=2, tp=2, args=(2,))   # one return value per rank

A failure on any rank is re-raised in the caller with that rank's traceback. Spawning costs a few
seconds of imports, so group related checks into one call (`run_checks` helps with that).
"""

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from megatron_tropd.runtime.cli import free_port


class DistributedTestError(AssertionError):
    pass


def _worker(rank, world_size, port, tp, pp, seed, fn, args, result_dir):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Two cores: one thread per process keeps N processes from oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    from megatron_tropd.runtime import initialize

    outcome = {}
    try:
        initialize.initialize_distributed(tp, pp, seed=seed, timeout_minutes=5)
        outcome["value"] = fn(*args)
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        outcome["error"] = traceback.format_exc()
    torch.save(outcome, os.path.join(result_dir, f"rank{rank}.pt"))
    try:
        initialize.destroy()
    except Exception:  # noqa: BLE001 - a failed peer may have broken the group already
        pass


def run_distributed(fn, world_size: int, tp: int = 1, pp: int = 1, args=(), seed: int = 1234,
                    timeout: float = 600.0):
    """Run `fn(*args)` on `world_size` gloo processes with megatron groups (tp, pp); return the list
    of every rank's return value. `fn` must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [
            ctx.Process(target=_worker,
                        args=(r, world_size, port, tp, pp, seed, fn, args, result_dir))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        errors = []
        outcomes = {}
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                errors.append(f"rank {rank}: timed out after {timeout:.0f}s")
                continue
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited with code {p.exitcode} and no result")
                continue
            outcomes[rank] = torch.load(path, weights_only=False)
            if "error" in outcomes[rank]:
                errors.append(f"rank {rank}:\n{outcomes[rank]['error']}")
        if errors:
            raise DistributedTestError("\n".join(errors))
        return [outcomes[r]["value"] for r in range(world_size)]


def run_checks(checks, *args):
    """Run every `check(*args)` in `checks` (a list of functions), collecting failures by name
    instead of stopping at the first: `{name: None or traceback}`. Meant to be the `fn` of
    `run_distributed`, so one spawn serves many assertions; `merge_reports` joins the ranks'."""
    report = {}
    for check in checks:
        try:
            check(*args)
            report[check.__name__] = None
        except Exception:  # noqa: BLE001
            report[check.__name__] = traceback.format_exc()
    return report


def merge_reports(reports):
    """Per check name, the first failure on any rank (with the rank), or None if all passed."""
    merged = {}
    for rank, report in enumerate(reports):
        for name, error in report.items():
            if merged.get(name) is None:
                merged[name] = None if error is None else f"rank {rank}:\n{error}"
    return merged
