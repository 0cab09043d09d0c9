"""Architecture description of a decoder-only LM (Llama, Qwen2, Qwen3, Mistral families).

`ModelArch` is the one place that knows how an HF `config.json` maps onto megatron-core's
`TransformerConfig`/`GPTModel` arguments. It reads HF configs and our own small JSON configs (the
same field names as `ModelArch`, plus `"family"`), and writes HF configs back for export.
"""

import dataclasses
import json
import os
from typing import Optional

from megatron_tropd.errors import UserError

# HF model_type -> what differs between the families megatron-core needs to know.
FAMILIES = {
    "llama": dict(add_qkv_bias=False, qk_layernorm=False),
    "mistral": dict(add_qkv_bias=False, qk_layernorm=False),
    "qwen2": dict(add_qkv_bias=True, qk_layernorm=False),
    "qwen3": dict(add_qkv_bias=False, qk_layernorm=True),
}
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ArchitectureError(UserError):
    """A model description that megatron-tropd cannot build: one-line message."""


@dataclasses.dataclass
class ModelArch:
    """What is needed to build a GPTModel for one of the supported families.

    Args:
        family: llama | mistral | qwen2 | qwen3.
        vocab_size: rows of the HF embedding (`config.vocab_size`, not `len(tokenizer)`).
        hidden_size, ffn_hidden_size, num_layers, num_attention_heads: the usual sizes.
        num_query_groups: key/value heads (GQA; 1 is MQA; equal to heads is MHA).
        head_dim: per-head size (`head_dim` in HF, megatron's `kv_channels`).
        rope_theta: RoPE base. rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: output layer shares the embedding matrix.
        max_position_embeddings: longest sequence the model is built for.
        rope_scaling_factor: Llama-3 RoPE scaling factor, None when the model has none.
    """

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_scaling_factor: Optional[float] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ArchitectureError(
                f"unknown architecture '{self.family}': supported are {', '.join(sorted(FAMILIES))}"
            )
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ArchitectureError(
                f"attention heads ({self.num_attention_heads}) must be a multiple of key/value "
                f"heads ({self.num_query_groups})"
            )

    @property
    def add_qkv_bias(self) -> bool:
        return FAMILIES[self.family]["add_qkv_bias"]

    @property
    def qk_layernorm(self) -> bool:
        return FAMILIES[self.family]["qk_layernorm"]

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArch":
        """From the dict of an HF `config.json`."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            archs = cfg.get("architectures") or []
            family = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), family)
        if family not in FAMILIES:
            raise ArchitectureError(
                f"unknown architecture '{family or cfg.get('architectures')}': supported are "
                f"{', '.join(sorted(FAMILIES))}"
            )
        if family == "qwen2" and cfg.get("use_sliding_window"):
            raise ArchitectureError("Qwen2 sliding-window attention is not supported")
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_query_groups=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(cfg.get("rope_theta", _rope_parameters(cfg).get("rope_theta", 1e4))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling_factor=_llama3_rope_factor(cfg),
        )

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArch":
        """From an HF config dict (has `model_type` or `architectures`) or our own (has `family`)."""
        if "family" in cfg:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(cfg) - fields)
            if unknown:
                raise ArchitectureError(f"unknown model config keys: {', '.join(unknown)}")
            return cls(**cfg)
        return cls.from_hf_config(cfg)

    @classmethod
    def from_file(cls, path: str) -> "ModelArch":
        """From a JSON file, or a directory holding `config.json` (an HF or converted checkpoint)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ArchitectureError(f"model config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"model config {path} is not valid JSON: {e}") from None
        return cls.from_dict(cfg)

    # --- writing -------------------------------------------------------------------------------

    def to_hf_config(self) -> dict:
        """An HF `config.json` dict that transformers builds the same model from."""
        arch = {v: k for k, v in _HF_ARCHITECTURES.items()}[self.family]
        cfg = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,  # Qwen2's q/k/v biases are implied by its model_type
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.rope_scaling_factor is not None:
            cfg["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        return cfg


def _rope_parameters(cfg: dict) -> dict:
    # transformers >= 5 nests rope settings under "rope_parameters".
    return cfg.get("rope_parameters") or {}


def _llama3_rope_factor(cfg: dict) -> Optional[float]:
    """Llama-3 RoPE scaling factor, checked against the constants megatron-core hard-codes."""
    scaling = cfg.get("rope_scaling") or _rope_parameters(cfg)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ArchitectureError(f"unsupported rope scaling type '{kind}' (only llama3 is supported)")
    expected = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    for key, value in expected.items():
        if float(scaling.get(key, value)) != value:
            raise ArchitectureError(
                f"llama3 rope scaling {key}={scaling[key]} is not supported (megatron-core uses {value})"
            )
    return float(scaling["factor"])
