"""The Megatron model checkpoint directory: what the trainer loads, the converter writes and the
exporter reads.

    <dir>/config.json           HF config: `ModelArch.from_file(<dir>)` rebuilds the model
    <dir>/tokenizer files       as the HF model had them (`hf_checkpoint.COMPANION_FILES`)
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
import os
import shutil

import torch
import torch.distributed as dist

from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.hf_checkpoint import CheckpointError, copy_companion_files

FORMAT_VERSION = 1
METADATA_FILE = "megatron_tropd.json"
WEIGHTS_DIR = "model"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


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
    """Yield a fresh directory next to `target` that becomes `target` when the block succeeds and
    is removed when it fails. Collective when torch.distributed is initialised (every rank gets
    the same path; rank 0 touches the file system)."""
    check_output_dir(target, overwrite)
    target = os.path.abspath(target)
    partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
        os.makedirs(partial)
    _barrier()
    try:
        yield partial
        _barrier()
        if _rank() == 0:
            if os.path.exists(target):
                shutil.rmtree(target)
            os.rename(partial, target)
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise


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


def write_model(directory: str, model, arch: ModelArch, *, source_dir: str = None,
                iteration: int = 0, metadata: dict = None):
    """Write the checkpoint files into an existing empty `directory` (collective); `save_model`
    and the trainer's checkpoints wrap this in `atomic_directory`."""
    from megatron.core import dist_checkpointing, parallel_state

    if _rank() == 0:
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
    _barrier()
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
    from megatron.core import dist_checkpointing

    meta = read_metadata(directory)
    weights = os.path.join(directory, WEIGHTS_DIR)
    if not dist_checkpointing.check_is_distributed_checkpoint(weights):
        raise CheckpointError(f"{weights} is not a megatron-core distributed checkpoint")
    state = dist_checkpointing.load(model.sharded_state_dict(), weights)
    model.load_state_dict(state)
    return meta


def write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
