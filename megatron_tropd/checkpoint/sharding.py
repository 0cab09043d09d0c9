"""Map between a model's *global* megatron state dict (TP=1, PP=1 names, shapes and vocabulary
rows) and this rank's local parameters at the current TP/PP layout.

Global names are the local names with pipeline-local layer numbers made global
(`decoder.layers.{j}` on stage s is layer `s * layers_per_stage + j`). Global embedding and output
rows are the unpadded vocabulary. Tensor-parallel splits follow the `partition_dim` megatron-core
sets on each parameter, with the one layout a plain chunk gets wrong: the gated MLP's `linear_fc1`,
whose TP rank r holds `cat(gate.chunk(tp)[r], up.chunk(tp)[r])`.

Used by the model-parity tests and the HF <-> Megatron converter.
"""

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _layout():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_rank())


def _layer_offset(model) -> int:
    _, _, _, pp_rank = _layout()
    return pp_rank * len(model.decoder.layers)


def to_global_name(model, local_name: str) -> str:
    offset = _layer_offset(model)
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def _is_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def shard(model, local_name: str, param, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global tensor `full` for local parameter `param`."""
    tp, rank, _, _ = _layout()
    if local_name in _VOCAB_ROWS:
        padded = full.new_zeros((param.shape[0] * tp,) + tuple(full.shape[1:]))
        padded[: full.shape[0]] = full
        full = padded
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if _is_fc1(local_name, model):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def unshard(model, local_name: str, param, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The global tensor from every TP rank's `local` part (collective over the TP group)."""
    tp, _, group, _ = _layout()
    full = local
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim = param.partition_dim
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        if _is_fc1(local_name, model):
            halves = [p.chunk(2, dim=dim) for p in parts]
            full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
        else:
            full = torch.cat(parts, dim=dim)
    if local_name in _VOCAB_ROWS:
        full = full[:vocab_size]
    return full


def global_state_dict(model, vocab_size: int, grads: bool = False) -> dict:
    """This pipeline stage's parameters (or their gradients: megatron DDP's `main_grad` when the
    model is wrapped, else `.grad`) under global names, gathered over TP.

    Tied embeddings: the last stage's copy of the embedding (`output_layer.weight` when
    `share_embeddings_and_output_weights` at PP>1) is left out, as in the global dict.
    """
    out = {}
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue
        tensor = getattr(param, "main_grad", param.grad) if grads else param.data
        if tensor is None:
            tensor = torch.zeros_like(param)
        out[to_global_name(model, name)] = unshard(model, name, param, tensor, vocab_size).clone()
    return out


@torch.no_grad()
def load_global_state_dict(model, state_dict: dict):
    """Copy the global tensors this rank holds into `model` (every parameter must be present).

    With tied embeddings, the last stage's output-layer copy is filled from the embedding.
    """
    for name, param in model.named_parameters():
        key = to_global_name(model, name)
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            key = "embedding.word_embeddings.weight"
        if key not in state_dict:
            raise KeyError(f"missing tensor {key} in the state dict")
        param.copy_(shard(model, name, param, state_dict[key]))
