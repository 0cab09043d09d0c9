"""Compare a Megatron model's logits with HF transformers' on the same token ids: the check that
a converted model computes what the original did.

Judge by `max_abs_logit_diff` and `kl`: a swapped gate/up pair can still agree on most top-1
tokens while its logits are off by 3 or more (docs/CONVERSION.md has the measured figures).
"""

import dataclasses

import torch
import torch.distributed as dist

from megatron_tropd.errors import UserError
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu

# ModelArch fields that do not take part in the comparison: max_position_embeddings only bounds the
# sequence length (RoPE is computed per position, and Llama-3 scaling uses its own fixed original
# length), so it may differ without changing a logit. Everything else defines the computation;
# vocab_size is the HF row count on both sides (the padding to 128 * TP happens at build time and
# is not stored), and the dtype is not an architecture field (--dtype chooses it).
NOT_COMPARED = ("max_position_embeddings",)


class ParityError(UserError):
    """Two models that do not compute the same thing: configs that differ, or logits off by more
    than the thresholds. One-line message."""


def arch_difference(a, b):
    """The first architecture-defining field in which ModelArchs `a` and `b` differ, as
    (name, a's value, b's value), or None."""
    for field in dataclasses.fields(a):
        if field.name not in NOT_COMPARED and getattr(a, field.name) != getattr(b, field.name):
            return field.name, getattr(a, field.name), getattr(b, field.name)
    return None


@torch.no_grad()


@cuda_to_cpu()
def forward_logits(model, tokens: torch.Tensor, vocab_size: int):
    """Logits [batch, seq, vocab_size] (padded columns dropped) of `tokens` [batch, seq] on the
    last pipeline stage, None on the others: one forward of the whole batch through the stages.
    Collective over the model-parallel ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(seq, batch, model.config.hidden_size,
                             dtype=model.config.pipeline_dtype, device=device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, position_ids, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return tensor_parallel.gather_from_tensor_model_parallel_region(out)[..., :vocab_size]


@torch.no_grad()
def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Reference logits [batch, seq, vocab] from transformers (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()(tokens.to(device)).logits


def logit_parity(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Agreement of `logits` with `reference`, both [..., vocab]: max |difference|,
    KL(reference || logits) averaged over positions, top-1 agreement (fraction), in float64."""
    ref, ours = reference.double().cpu(), logits.double().cpu()
    ref_logp, logp = ref.log_softmax(-1), ours.log_softmax(-1)
    return {
        "max_abs_logit_diff": (ref - ours).abs().max().item(),
        "kl": (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item(),
        "top1_agree": (ref.argmax(-1) == ours.argmax(-1)).double().mean().item(),
    }


def threshold_error(parity: dict, max_abs_diff: float, max_kl: float):
    """One line naming each metric of `logit_parity` above its threshold, or None."""
    over = [f"{name}={parity[name]:.3g} exceeds {flag} {limit:g}"
            for name, flag, limit in (("max_abs_logit_diff", "--max-abs-diff", max_abs_diff),
                                      ("kl", "--max-kl", max_kl))
            if not parity[name] <= limit]  # NaN fails too
    return "; ".join(over) or None


def format_parity(parity: dict) -> str:
    return " ".join(f"{k}={parity[k]:.3g}" for k in ("max_abs_logit_diff", "kl", "top1_agree"))
