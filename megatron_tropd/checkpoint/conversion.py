"""Checkpoint conversion between HF model directories and Megatron checkpoint directories
(`model_dir.py`), streaming one tensor at a time.

HF -> Megatron runs on the TP x PP ranks of the target layout: each rank builds only its own
stage, reads from the safetensors files just the tensors that stage holds, and the
stages save together as one reshardable checkpoint. Megatron -> HF runs in one process: it loads
the checkpoint (saved at any TP/PP) at TP=1/PP=1, turns each parameter into its HF tensors,
hands them to the shard writer and frees the parameter. Neither direction holds two copies of
the model (docs/CONVERSION.md has the measured peak).

Every input check runs before anything is built or written; failures are one-line
`CheckpointError`/`ArchitectureError`s and leave no output directory behind.
"""

import json
import os
from collections.abc import Mapping

import torch

from megatron_tropd.checkpoint import CheckpointError
from megatron_tropd.checkpoint.hf_files import HFWeights, SafetensorsWriter, copy_companion_files
from megatron_tropd.checkpoint.hf_mapping import hf_shapes, tensor_mappings
from megatron_tropd.checkpoint.model_dir import (atomic_directory, check_output_dir, load_model,
                                                 params_dtype, read_metadata, save_model,
                                                 write_json)
from megatron_tropd.checkpoint.sharding import load_global_state_dict, unshard
from megatron_tropd.errors import UserError
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.builder import build_model, check_parallel_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_hf_model(hf_dir: str, tp: int = 1, pp: int = 1):
    """The architecture and weights of an HF directory, checked against each other and against
    the TP x PP layout. Reads headers only; needs no process group."""
    arch = ModelArch.from_file(hf_dir)
    check_parallel_layout(arch, tp, pp)
    weights = HFWeights(hf_dir)
    weights.check(hf_shapes(arch))
    return arch, weights


class _GlobalMegatronView(Mapping):
    """The global megatron state dict of an HF model, each tensor read and rearranged on access
    (what `sharding.load_global_state_dict` asks for, without holding the model twice)."""

    def __init__(self, arch: ModelArch, weights: HFWeights):
        self.arch, self.weights = arch, weights
        self.mappings = {m.megatron: m for m in tensor_mappings(arch)}

    def __contains__(self, name):  # Mapping's default would read the tensor to find out
        return name in self.mappings

    def __getitem__(self, name):
        m = self.mappings[name]
        return m.to_megatron(self.arch, [self.weights.get(h) for h in m.hf])

    def __iter__(self):
        return iter(self.mappings)

    def __len__(self):
        return len(self.mappings)


def build_from_hf(hf_dir: str, dtype: torch.dtype = torch.float32, role: str = "student"):
    """(arch, this rank's model stage) built at the current TP x PP layout with the HF weights
    loaded, read tensor by tensor (collective over the model-parallel group)."""
    from megatron.core import parallel_state as ps

    arch, weights = open_hf_model(hf_dir, ps.get_tensor_model_parallel_world_size(),
                                  ps.get_pipeline_model_parallel_world_size())
    # Initialised although every weight is overwritten: megatron-core sets the tensor-parallel
    # attributes `sharding.py` splits by only when it initialises.
    model = build_model(arch, role, params_dtype=dtype)
    load_global_state_dict(model, _GlobalMegatronView(arch, weights))
    return arch, model


def hf_to_megatron(hf_dir: str, output_dir: str, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False):
    """Convert an HF model directory into a Megatron checkpoint at the current TP x PP layout.

    Collective over exactly TP x PP ranks, with megatron's parallel state initialised.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if dist.get_world_size() != tp * pp:
        raise UserError(f"conversion runs on TP x PP = {tp * pp} processes, not "
                        f"{dist.get_world_size()} (no data-parallel replicas)")
    check_output_dir(output_dir, overwrite)
    arch, model = build_from_hf(hf_dir, dtype)
    save_model(output_dir, model, arch, source_dir=hf_dir, overwrite=overwrite,
               metadata={"converted_from": os.path.abspath(hf_dir)})


def megatron_to_hf(megatron_dir: str, output_dir: str, dtype: torch.dtype = None,
                   overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3):
    """Export a Megatron checkpoint (saved at any TP/PP) as an HF model directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads.

    One process, megatron initialised at TP=1/PP=1. `dtype` defaults to the checkpoint's.
    Padded vocabulary rows are dropped; tied embeddings are written as HF does (no lm_head).
    """
    from megatron.core import parallel_state as ps

    meta = read_metadata(megatron_dir)
    arch = ModelArch.from_file(megatron_dir)
    check_output_dir(output_dir, overwrite)
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() != 1:
        raise CheckpointError("export runs in one process (TP=1, PP=1): the checkpoint is "
                              "resharded on load")
    dtype = dtype or params_dtype(meta)
    model = build_model(arch, params_dtype=params_dtype(meta), perform_initialization=False)
    load_model(megatron_dir, model)
    params = dict(model.named_parameters())
    with atomic_directory(output_dir, overwrite) as tmp:
        writer = SafetensorsWriter(tmp, max_shard_bytes)
        for m in tensor_mappings(arch):
            param = params[m.megatron]
            full = unshard(model, m.megatron, param, param.data, arch.vocab_size)
            for name, tensor in m.to_hf(arch, full).items():
                writer.add(name, tensor.to(dtype, copy=True))
            # Freed as it is written: parameters plus written tensors stay one model in size.
            param.data = torch.empty(0, dtype=param.dtype)
        writer.finish()
        with open(os.path.join(megatron_dir, "config.json")) as f:
            config = json.load(f)
        config["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in config:  # the name transformers < 5 reads
            config["torch_dtype"] = config["dtype"]
        write_json(os.path.join(tmp, "config.json"), config)
        copy_companion_files(megatron_dir, tmp)
