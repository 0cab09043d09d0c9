"""Trainer checkpoints and exact resume.

    <save>/iter_0000200/           a model checkpoint directory (model_dir.py: config.json,
                                   tokenizer files, megatron_tropd.json, model/) plus
              optimizer/           megatron-core dist_checkpointing of the optimiser state
              rng/rank_00003.pt    each rank's python / numpy / torch RNG states
    <save>/latest                  the iteration of the last *complete* checkpoint
    <save>/.lock                   held by the run that owns the directory (`SaveDirLock`)

A checkpoint is written under a temporary name and renamed when every rank has finished; `latest`
is replaced atomically after that, and only then are checkpoints beyond `--keep-last` deleted. A
crash mid-save therefore leaves the previous checkpoint and `latest` intact; a write that fails (a
full disk, an unwritable directory) is a one-line `CheckpointError` on every rank, the partial
directory removed. A missing or corrupt file met on resume is a one-line error too. Model and optimiser
state are reshardable (load at another TP/PP); the trainer state (iteration, LR schedule, data
position) lives in megatron_tropd.json. Sampling and trust-test draws are keyed by (seed, sample id,
position), so a resumed run draws what an uninterrupted one would have. Which flags a resume
keeps from the checkpoint and which it takes from the command line: `resume_flags`.
"""

import fcntl
import os
import random
import shutil
import socket

import numpy as np
import torch

from megatron_tropd.checkpoint import CheckpointError, model_dir, resume_flags
from megatron_tropd.records import DataError
from megatron_tropd.runtime import faults
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.runtime.initialize import barrier, first_error, print_rank_0, rank, world_size

LATEST = "latest"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"


def _iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def due(args, iteration: int) -> bool:
    if not args.save:
        return False
    at_interval = args.save_interval and iteration % args.save_interval == 0
    return bool(at_interval) or iteration == args.train_iters


def load_weights(directory: str, model) -> dict:
    """Model weights from a converted or trainer checkpoint directory (any TP/PP it was saved at)."""
    return model_dir.load_model(directory, model)


# The distributed optimizer's state in the format that reshards over TP, PP and DP. megatron-core's
# default ('fully_sharded_model_space') is deprecated, and saving it fails ("ShardedTensor.
# flattened_range is not supported"); the plain optimizer ignores this.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def check_writable(directory: str):
    """Fail at start-up, not at the first save hours later, when `--save` cannot be written (every
    rank checks: each writes its own shards, maybe on its own node)."""
    if not directory:
        return
    probe = os.path.join(directory, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--save {directory}: cannot write there ({e.strerror})") from None


LOCK_FILE = ".lock"


class SaveDirLock:
    """`--save` owned by one run: rank 0 holds an exclusive `flock` on `<save>/.lock` from
    start-up until `release` (or its death: the kernel drops the lock of a killed process, so a
    SIGKILLed run leaves nothing stale; the file itself stays, naming the last owner). A second
    run on the directory, say a requeued job overlapping its predecessor, stops at once on every
    rank instead of writing into the other's checkpoints (collective)."""

    def __init__(self, directory: str):
        self.file = None
        error = None
        if directory and rank() == 0:
            error = self._acquire(directory)
        failure = first_error(error)
        if failure is not None:
            self.release()
            raise CheckpointError(failure)

    def _acquire(self, directory: str):
        path = os.path.join(directory, LOCK_FILE)
        try:
            self.file = open(path, "a+")
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "pid ? on host ?"
            return f"--save {directory} is in use by another run ({owner})"
        except OSError as e:
            return f"--save {directory}: cannot lock {path} ({e.strerror})"
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.file.flush()
        return None

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


@cuda_to_cpu()
def save(args, student, state):
    """Save the student (weights, optimiser) and the run's state at `state.iteration`
    (collective). A failure on any rank (a full disk, a directory that became unwritable) is a
    one-line `CheckpointError` on every rank, and the previous checkpoint and `latest` are left as
    they were."""
    from megatron.core import dist_checkpointing

    iteration = state.iteration
    target = _iteration_dir(args.save, iteration)
    trainer = {**state.state_dict(), "flags": resume_flags.recorded_flags(args)}
    trainer.pop("iteration")  # the model directory's metadata holds it
    try:
        with model_dir.atomic_directory(target, overwrite=True) as tmp:
            model_dir.write_model(tmp, student.model, student.arch, source_dir=student.source,
                                  iteration=iteration,
                                  metadata={"trainer": trainer, "world_size": world_size()})
            faults.point("save", iteration)
            optimizer_dir = os.path.join(tmp, OPTIMIZER_DIR)
            if rank() == 0:
                os.makedirs(optimizer_dir)
                os.makedirs(os.path.join(tmp, RNG_DIR))
            barrier()
            dist_checkpointing.save(student.optimizer.sharded_state_dict(
                student.model.sharded_state_dict(), metadata=_OPTIMIZER_FORMAT), optimizer_dir)
            torch.save(_rng_state(), os.path.join(tmp, RNG_DIR, f"rank_{rank():05d}.pt"))
        faults.point("commit", iteration)
        model_dir.on_rank_0(lambda: _write_latest(args.save, iteration),
                                   os.path.join(args.save, LATEST))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_intact(args.save)}") from None
    if rank() == 0:
        _prune(args.save, args.keep_last, iteration)
    barrier()
    print_rank_0(f"saved checkpoint {target}")


def _intact(root: str) -> str:
    """What a failed save left to resume from."""
    if os.path.isfile(os.path.join(root, LATEST)):
        return f"{os.path.join(root, LATEST)} still names iteration {_read_latest(root)}"
    return "no earlier checkpoint to resume from"


@cuda_to_cpu()
def resume(args, student, state):
    """Load the student and the run's state from the latest checkpoint in `--load` (default
    `--save`), if there is one."""
    root = args.load or args.save
    if not root or not os.path.isfile(os.path.join(root, LATEST)):
        if args.load:
            raise CheckpointError(f"--load {args.load}: no '{LATEST}' file, so no checkpoint to "
                                  f"resume from")
        return
    directory = latest_checkpoint(root)
    meta = model_dir.load_model(directory, student.model)
    if "trainer" not in meta:
        raise CheckpointError(f"{directory} is a model checkpoint without trainer state")
    trainer = meta["trainer"]
    optimizer = student.optimizer
    schedule = state.scheduler.state_dict()  # --no-load-optim: the command line's schedule
    if args.no_load_optim:
        optimizer.reload_model_params()
    else:
        schedule = resume_flags.resumed_scheduler_state(args, schedule, trainer["scheduler"])
        resume_flags.set_param_group_lrs(optimizer, trainer["scheduler"])
        sharded = optimizer.sharded_state_dict(student.model.sharded_state_dict(),
                                               is_loading=True, metadata=_OPTIMIZER_FORMAT)
        optimizer.load_state_dict(model_dir.read_dist_checkpoint(
            sharded, os.path.join(directory, OPTIMIZER_DIR)))
        resume_flags.set_param_group_lrs(optimizer, schedule)
    try:
        state.load_state_dict({"iteration": meta["iteration"], "scheduler": schedule,
                               "sampler": trainer["sampler"]})
    except DataError as e:  # another --seed, or a prompts file of another size
        raise CheckpointError(f"cannot resume from {directory}: {e}") from None
    resume_flags.announce_changes(args, trainer.get("flags", {}))
    rng_file = os.path.join(directory, RNG_DIR, f"rank_{rank():05d}.pt")
    error = None
    if _same_layout(meta) and os.path.isfile(rng_file):
        try:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a corrupt file
            error = f"cannot read {rng_file} ({model_dir.describe_error(e)})"
    failure = first_error(error)  # a rank's own file: the others must stop too
    if failure is not None:
        raise CheckpointError(failure)
    print_rank_0(f"resumed from {directory} at iteration {state.iteration}")


def _same_layout(meta) -> bool:
    from megatron.core import parallel_state as ps

    return (meta.get("tensor_model_parallel_size") == ps.get_tensor_model_parallel_world_size()
            and meta.get("pipeline_model_parallel_size") == ps.get_pipeline_model_parallel_world_size()
            and meta.get("world_size") == world_size())


def _rng_state():
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state):
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _write_latest(root: str, iteration: int):
    tmp = os.path.join(root, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def _read_latest(root: str) -> int:
    text = open(os.path.join(root, LATEST)).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{os.path.join(root, LATEST)} does not hold an iteration: {text!r}")
    return int(text)


def latest_checkpoint(root: str) -> str:
    """The directory of the latest checkpoint saved under `root` (a model checkpoint dir)."""
    return _iteration_dir(root, _read_latest(root))


def _prune(root: str, keep_last: int, latest: int):
    if keep_last <= 0:
        return
    iterations = sorted(int(name[5:]) for name in os.listdir(root)
                        if name.startswith("iter_") and name[5:].isdigit())
    for iteration in iterations[:-keep_last]:
        if iteration != latest:
            shutil.rmtree(_iteration_dir(root, iteration), ignore_errors=True)
