"""Map between an HF state dict (Llama, Qwen2, Qwen3, Mistral) and the *global* megatron-core
state dict (TP=1/PP=1 names and shapes, unpadded vocabulary rows; `sharding.py` takes it on to
this rank's parameters).

Pure tensor code: no files, no process groups. Two layouts differ between the formats (see
shared/docs/CONVERSION.md):
  - `linear_qkv` rows are grouped by key/value group, `[q(g, 0..hpg-1) | k(g) | v(g)]` for each
    group g, so that a tensor-parallel rank's chunk holds whole groups (biases the same);
  - `linear_fc1` is `cat(gate, up)` on the output dimension (megatron computes
    `silu(first half) * second half`).
Everything else is the same tensor under another name.
"""

from typing import Dict, List, NamedTuple, Sequence

import torch

from megatron_tropd.models.arch import ModelArch

# Per decoder layer: megatron suffix, HF suffixes, layout, the ModelArch flag the tensor needs.
_LAYER_TENSORS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "same", None),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv", None),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv",
     "add_qkv_bias"),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "same", "qk_layernorm"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "same", "qk_layernorm"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "same", None),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "same", None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", None),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "same", None),
)


class TensorMapping(NamedTuple):
    """One global megatron tensor and the HF tensors it is made of (in order)."""

    megatron: str
    hf: tuple
    layout: str  # same | qkv | gate_up

    def to_megatron(self, arch: ModelArch, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.layout == "qkv":
            return _qkv_to_megatron(arch, *hf_tensors)
        if self.layout == "gate_up":
            return torch.cat(list(hf_tensors), dim=0)
        (tensor,) = hf_tensors
        return tensor

    def to_hf(self, arch: ModelArch, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.layout == "qkv":
            parts = _qkv_to_hf(arch, tensor)
        elif self.layout == "gate_up":
            parts = tensor.chunk(2, dim=0)
        else:
            parts = (tensor,)
        return dict(zip(self.hf, parts))


def tensor_mappings(arch: ModelArch) -> List[TensorMapping]:
    """Every tensor of the model, in HF order (embedding, layers, final norm, output layer).

    Tied embeddings have no output layer tensor on either side: megatron ties it to the
    embedding, HF files leave `lm_head.weight` out.
    """
    out = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "same")]
    for i in range(arch.num_layers):
        for mcore, hf, layout, needs in _LAYER_TENSORS:
            if needs is None or getattr(arch, needs):
                out.append(TensorMapping(f"decoder.layers.{i}.{mcore}",
                                         tuple(f"model.layers.{i}.{h}" for h in hf), layout))
    out.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "same"))
    if not arch.tie_word_embeddings:
        out.append(TensorMapping("output_layer.weight", ("lm_head.weight",), "same"))
    return out


def hf_shapes(arch: ModelArch) -> Dict[str, tuple]:
    """The shape of every tensor an HF checkpoint of `arch` holds."""
    h, hd, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return {name: shapes[name] for m in tensor_mappings(arch) for name in m.hf}


def _groups(arch: ModelArch):
    ng = arch.num_query_groups
    return ng, arch.num_attention_heads // ng, arch.head_dim


def _qkv_to_megatron(arch, q, k, v):
    """[q; k; v] rows (HF) -> rows grouped by key/value group (weights [., H] and biases [.])."""
    ng, hpg, hd = _groups(arch)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(ng, hpg * hd, *rest), k.reshape(ng, hd, *rest),
                         v.reshape(ng, hd, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def _qkv_to_hf(arch, qkv):
    ng, hpg, hd = _groups(arch)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, hpg + 2, hd, *rest).split([hpg, 1, 1], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))
