"""The Megatron model checkpoint directory: what the trainer loads, the converter writes and the
exporter reads.

    <dir>/config.json           HF config: `ModelArch.from_file(<dir>)` rebuilds the model
    <dir>/tokenizer files       as the HF model had them (`hf_files.COMPANION_FILES`)
    <dir>/megatron_tropd.json   format version, iteration, the TP/PP and dtype it was saved at
    <dir>/model/                megatron-core `dist_checkpointing` of `model.sharded_state_dict()`

The weights are reshardable: a checkpoint saved at one TP/PP loads at any other. The padded
vocabulary (a multiple of 128 * TP) changes with TP; megatron-core marks the embedding and output
layer `allow_shape_mismatch`, so a load reads the rows both sizes share and the rest (padding) is
zero. Directories are written under a temporary name next to the target and renamed when complete,
so a failed save leaves no partial checkpoint behind.
"""

import contextlib
import json
import logging
import os
import shutil

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_tropd.checkpoint import CheckpointError
from megatron_tropd.checkpoint.hf_files import copy_companion_files
from megatron_tropd.checkpoint.writers import bind_writer_processes
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.runtime.initialize import barrier, first_error, rank

FORMAT_VERSION = 1
METADATA_FILE = "megatron_tropd.json"
WEIGHTS_DIR = "model"
# What a full or unwritable disk, or a missing or corrupt file, raises (torch.distributed.checkpoint
# gathers every rank's exceptions into a CheckpointException, a BaseException).
FILE_ERRORS = (OSError, CheckpointException)
# What a write may raise besides: torch.save and megatron-core's writers raise RuntimeError (a
# directory removed under them, ...) and more; any of them is a failed save. KeyboardInterrupt
# and SystemExit are not.
WRITE_ERRORS = (Exception, CheckpointException)


def check_output_dir(target: str, overwrite: bool):
    """Refuse to replace a non-empty directory (or a file) unless `overwrite`."""
    if not os.path.exists(target) or overwrite:
        return
    if not os.path.isdir(target):
        raise CheckpointError(f"output path {target} exists and is not a directory")
    if os.listdir(target):
        raise CheckpointError(
            f"output directory {target} exists and is not empty (use --overwrite to replace it)"
        )


@contextlib.contextmanager
def atomic_directory(target: str, overwrite: bool = False):
    """Yield a fresh directory next to `target` that becomes `target` when the block succeeds on
    every rank and is removed when it fails on any. Collective when torch.distributed is
    initialised (every rank gets the same path; rank 0 touches the file system): a rank whose
    block fails tells the others, and every rank raises a one-line `CheckpointError` naming the
    first failure, whatever the writer raised. Two limits: `overwrite` removes an existing `target` just
    before the rename, and a rank that fails inside a collective of megatron-core's
    dist_checkpointing leaves the others waiting in it until the process-group timeout."""
    check_output_dir(target, overwrite)
    target = os.path.abspath(target)
    partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")

    def fresh():
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
        os.makedirs(partial)

    on_rank_0(fresh, target)
    error = None
    try:
        yield partial
    except BaseException as e:  # noqa: BLE001 - reported to every rank, then raised
        error = e
    failure = first_error(None if error is None else describe_error(error))
    if failure is not None:
        if rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if error is not None and not isinstance(error, WRITE_ERRORS):
            raise error
        raise CheckpointError(f"cannot write {target} ({failure})") from None

    def commit():
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(partial, target)

    on_rank_0(commit, target)


def on_rank_0(fn, target: str):
    """Run `fn` on rank 0; if it fails, every rank raises the same one-line error (collective)."""
    error = None
    if rank() == 0:
        try:
            fn()
        except WRITE_ERRORS as e:
            error = describe_error(e)
    failure = first_error(error)
    if failure is not None:
        raise CheckpointError(f"cannot write {target} ({failure})")


def describe_error(error: BaseException) -> str:
    """One line for a file-system or dist_checkpointing failure: the OS's reason and the file, or
    the first failing rank's exception inside megatron-core / torch.distributed.checkpoint."""
    if isinstance(error, CheckpointException) and error.failures:
        inner, _ = min(error.failures.items())[1]  # the lowest failing rank's
        return describe_error(inner)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@cuda_to_cpu()
def read_dist_checkpoint(sharded_state_dict: dict, directory: str) -> dict:
    """megatron-core's `dist_checkpointing.load`, with a missing or corrupt file reported as a
    one-line `CheckpointError` (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    # torch.distributed.checkpoint logs a traceback to the root logger for a corrupt metadata
    # file before it raises; the one-line error below says what is wrong
    logging.disable(logging.WARNING)
    try:
        if not dist_checkpointing.check_is_distributed_checkpoint(directory):
            raise CheckpointError(f"{directory} is not a megatron-core distributed checkpoint")
        return dist_checkpointing.load(sharded_state_dict, directory)
    except (*FILE_ERRORS, CheckpointingException, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {directory} ({describe_error(e)})") from None
    finally:
        logging.disable(logging.NOTSET)


def save_model(directory: str, model, arch: ModelArch, *, source_dir: str = None,
               iteration: int = 0, metadata: dict = None, overwrite: bool = False):
    """Save this model (every rank's stage; collective) as a checkpoint directory, atomically.

    Args:
        source_dir: a directory whose config.json and tokenizer files travel with the weights (an
            HF model, or the checkpoint the model was loaded from); without it config.json is
            written from `arch`.
        iteration: training iteration the weights belong to (0 for a converted model).
        metadata: more JSON-serialisable fields for megatron_tropd.json.
    """
    with atomic_directory(directory, overwrite) as tmp:
        write_model(tmp, model, arch, source_dir=source_dir, iteration=iteration,
                    metadata=metadata)


@cuda_to_cpu()
def write_model(directory: str, model, arch: ModelArch, *, source_dir: str = None,
                iteration: int = 0, metadata: dict = None):
    """Write the checkpoint files into an existing empty `directory` (collective); `save_model`
    and the trainer's checkpoints wrap this in `atomic_directory`."""
    from megatron.core import dist_checkpointing, parallel_state

    if rank() == 0:
        if source_dir is not None:
            shutil.copyfile(os.path.join(source_dir, "config.json"),
                            os.path.join(directory, "config.json"))
            copy_companion_files(source_dir, directory)
        else:
            write_json(os.path.join(directory, "config.json"), arch.to_hf_config())
        write_json(os.path.join(directory, METADATA_FILE), {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size":
                parallel_state.get_pipeline_model_parallel_world_size(),
            "params_dtype": str(model.config.params_dtype).removeprefix("torch."),
            **(metadata or {}),
        })
        os.makedirs(os.path.join(directory, WEIGHTS_DIR))
    barrier()
    bind_writer_processes()  # the trainer's optimiser save comes after this one
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(directory, WEIGHTS_DIR))


def read_metadata(directory: str) -> dict:
    """The metadata of a checkpoint directory, or a one-line error if it is not one."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a megatron-tropd checkpoint (no {METADATA_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not "
                              f"{FORMAT_VERSION}, the one this code reads")
    return meta


def params_dtype(metadata: dict) -> torch.dtype:
    return getattr(torch, metadata["params_dtype"])


def load_model(directory: str, model) -> dict:
    """Load a checkpoint's weights into this model (built at any TP/PP; collective) and return
    its metadata."""
    meta = read_metadata(directory)
    state = read_dist_checkpoint(model.sharded_state_dict(), os.path.join(directory, WEIGHTS_DIR))
    model.load_state_dict(state)
    return meta


def write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
