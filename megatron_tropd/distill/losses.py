"""Per-token losses of TrOPD and its baselines (../shared/docs/METHOD.md sections 1-3).

Every method is a pure function `(TokenRecord, DistillConfig) -> LossOutput` on a micro-batch's
response tokens `[N]` (`megatron_tropd.tokens`): the student-side fields of the record were
computed vocabulary-parallel from the student's sharded logits (gradient flows through them), the
teacher's come from the scoring pass.
A method returns a per-token loss (zero where a token is not trained) and metric sums; the trainer
takes the token-mean over the global batch. `needs(config)` says which optional inputs a method
reads, so the trainer computes only those.

Notation as in METHOD.md: lp_S (student, with grad), lp_S_old (the sampler), lp_T (teacher),
k1 = lp_S_old - lp_T, advantage A = -k1, ratio = exp(lp_S - lp_S_old), sg = stop-gradient.
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_tropd.tokens import TokenRecord

METHODS = ("opd", "tropd", "eopd", "reopold", "reopold-2stage", "jsd", "fkl", "entropy-opd")
TRUST_REGIONS = ("stochastic", "deterministic", "kl")
OUTLIER_MODES = ("mask", "clip", "fkl")


# Hyper-parameters that belong to a method: used unless a flag sets them (the EOPD paper trains
# with PPO's clipped ratio, epsilon = 0.2).
METHOD_DEFAULTS = {"eopd": dict(ppo_clip=0.2)}


@dataclasses.dataclass
class DistillConfig:
    """Hyper-parameters of every method, with the papers' defaults.

    Args:
        method: one of METHODS.
        ppo_clip: PPO ratio clip ε for the policy-gradient terms (None: no clip); without the
            flag, the method's default (`METHOD_DEFAULTS`: EOPD 0.2).
        trust_region: stochastic (M ~ Bernoulli(min(1, π_T/π_S_old)), the paper) | deterministic
            (M = 1[lp_T - lp_S_old >= log τ]) | kl (M = 1[KL(π_S||π_T)(x_<t) <= δ]).
        trust_tau, trust_kl_delta: τ and δ of the two ablation variants.
        outlier_mode: what TrOPD does with untrusted tokens: mask | clip | fkl.
        fkl_code_faithful: for outlier_mode=fkl, write the no-grad top-k FKL value into the sampled
            token's advantage (A = -sg(FKL), the reported official code) instead of the paper's
            supervised top-k FKL with gradient through the student's top-k log-probs.
        topk_renormalize: renormalise the teacher's top-k probabilities over the k ids.
        clip_lambda: λ of the clipped advantage max(A, log(λ/(1-λ))) (TrOPD clip mode, REOPOLD).
        prefix_beta: β of the imitation term β·CE on teacher-prefix tokens.
        eopd_entropy_threshold, eopd_topk: EOPD adds a top-k FKL where H(π_T) exceeds the threshold.
        reopold_fraction: fraction of the highest-student-entropy tokens REOPOLD trains on;
            reopold_stage2_step: reopold-2stage's switch from its exploration stage (every token
            whose reward is above the clip floor) to that selection.
        entropy_opd_fraction: fraction of highest-entropy tokens Entropy-OPD trains on.
        jsd_beta: β of GKD's generalised JSD (0 forward KL, 1 reverse KL).
        importance_ratio_cap: C of a truncated importance weight: the policy-gradient terms use
            min(ratio, C), with the gradient of C · lp_S above the cap (token-level truncated IS,
            as verl's and NeMo-RL's); None: the plain ratio.
    """

    method: str = "tropd"
    ppo_clip: Optional[float] = None
    trust_region: str = "stochastic"
    trust_tau: float = 1.0
    trust_kl_delta: float = 1.0
    outlier_mode: str = "fkl"
    fkl_code_faithful: bool = False
    topk_renormalize: bool = False
    clip_lambda: float = 0.2
    prefix_beta: float = 0.001
    eopd_entropy_threshold: float = 0.8
    eopd_topk: int = 16
    reopold_fraction: float = 0.5
    reopold_stage2_step: int = 100
    entropy_opd_fraction: float = 0.2
    jsd_beta: float = 0.5
    importance_ratio_cap: Optional[float] = None

    @property
    def clip_floor(self) -> float:
        """c = log(λ / (1 - λ)): -1.386 for λ = 0.2."""
        return math.log(self.clip_lambda / (1.0 - self.clip_lambda))


@dataclasses.dataclass
class LossOutput:
    """`per_token [N]`: the loss of each token (0 where untrained); `metrics`: name -> (sum over
    tokens, count of tokens), reduced over micro-batches and data-parallel ranks by the trainer."""

    per_token: torch.Tensor
    metrics: Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Needs:
    """Optional inputs a method reads."""

    topk: bool = False            # teacher top-k log-probs and the student's at those ids
    teacher_entropy: bool = False
    jsd: bool = False             # full-vocabulary JSD against the teacher's log-prob shard
    reverse_kl: bool = False      # full-vocabulary KL(π_S||π_T) per position (KL trust region)
    uniform: bool = False
    selection: bool = False       # the trainer precomputes `selected` (token_selection)

    @property
    def teacher_full(self) -> bool:
        """Whether the student update needs the teacher's logits shard of each micro-batch."""
        return self.jsd or self.reverse_kl


# --- shared pieces ----------------------------------------------------------------------------------


def policy_gradient(advantage, x: TokenRecord, config: DistillConfig):
    """-sg(A) · ratio, PPO-clipped when `config.ppo_clip` (equals -A · lp_S in gradient
    on-policy); the ratio truncated at `config.importance_ratio_cap` first."""
    advantage = advantage.detach()
    ratio = torch.exp(x.student_logprobs - x.old_logprobs.detach())
    if config.importance_ratio_cap is not None:  # value min(r, C), gradient min(r, C) ∇lp_S
        ratio = ratio * (ratio.clamp(max=config.importance_ratio_cap) / ratio).detach()
    ppo_clip = config.ppo_clip
    loss = -advantage * ratio
    if ppo_clip is not None:
        clipped = torch.clamp(ratio, 1.0 - ppo_clip, 1.0 + ppo_clip)
        loss = torch.maximum(loss, -advantage * clipped)
    return loss


def k1_advantage(x: TokenRecord):
    """A = -k1 = lp_T - lp_S_old: the per-token reverse-KL reward of on-policy distillation."""
    return (x.teacher_logprobs - x.old_logprobs).detach()


def topk_forward_kl_terms(teacher_topk_log_probs, student_topk_log_probs, renormalize: bool = False):
    """Σ_{v ∈ TopK(π_T)} π_T(v) (log π_T(v) - log π_S(v)) from log-probs at the teacher's top-k ids
    `[..., k]` (both normalised over the full vocabulary). With `renormalize` the teacher's k
    probabilities are renormalised to sum to one first. Gradient flows through the student's."""
    teacher_lp = teacher_topk_log_probs.float()
    if renormalize:
        teacher_lp = teacher_lp - teacher_lp.logsumexp(dim=-1, keepdim=True)
    return (teacher_lp.exp() * (teacher_lp - student_topk_log_probs.float())).sum(dim=-1)


def topk_fkl(x: TokenRecord, config: DistillConfig, k: Optional[int] = None):
    """Top-k forward KL at each position (first k of the teacher's sorted top-k when k is given)."""
    teacher, student = x.teacher_topk_logprobs, x.student_topk_logprobs
    if k is not None:
        teacher, student = teacher[:, :k], student[:, :k]
    return topk_forward_kl_terms(teacher, student, config.topk_renormalize)


class _Metrics(dict):
    def add(self, name, values, mask):
        mask = mask.bool()
        self[name] = (torch.where(mask, values.detach().float(), 0.0).sum(),
                      mask.sum().float())


def _common_metrics(x: TokenRecord, config: DistillConfig) -> _Metrics:
    """What every method reports (added once, by `compute_loss`)."""
    metrics, on = _Metrics(), x.on_policy
    metrics.add("k1_reverse_kl", (x.old_logprobs - x.teacher_logprobs), on)
    metrics.add("advantage", k1_advantage(x), on)
    metrics.add("ratio", torch.exp(x.student_logprobs.detach() - x.old_logprobs), on)
    metrics.add("prefix_fraction", x.prefix.float(), on | x.prefix)
    if x.student_topk_logprobs is not None:
        metrics.add("teacher_topk_mass", x.teacher_topk_logprobs.exp().sum(-1), on)
        metrics.add("student_mass_on_teacher_topk", x.student_topk_logprobs.exp().sum(-1), on)
        metrics.add("topk_forward_kl", topk_fkl(x, config), on)
    if x.reverse_kl is not None:
        metrics.add("full_reverse_kl", x.reverse_kl, on)
    return metrics


def _masked(loss, mask):
    return torch.where(mask, loss, torch.zeros_like(loss))


# --- the methods ------------------------------------------------------------------------------------


def opd_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """Plain OPD: L = -sg(A) · exp(lp_S - lp_S_old) on every on-policy token, A = lp_T - lp_S_old."""
    metrics = _Metrics()
    loss = _masked(policy_gradient(k1_advantage(x), x, config), x.on_policy)
    metrics.add("loss_on_policy", loss, x.on_policy)
    return LossOutput(loss, metrics)


def trust_mask(x: TokenRecord, config: DistillConfig):
    """M_t: which on-policy tokens get the plain OPD signal.

    stochastic: U < P_trust = exp(min(0, lp_T - lp_S_old)) = min(1, π_T/π_S_old), the speculative-
    decoding acceptance test; deterministic: lp_T - lp_S_old >= log τ; kl: KL(π_S||π_T) <= δ.
    """
    log_ratio = (x.teacher_logprobs - x.old_logprobs).detach()
    if config.trust_region == "stochastic":
        return x.uniform < torch.exp(torch.clamp(log_ratio, max=0.0))
    if config.trust_region == "deterministic":
        return log_ratio >= math.log(config.trust_tau)
    return x.reverse_kl <= config.trust_kl_delta


def tropd_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """TrOPD (paper Eq. 13), per token:

        J = -1[x~π_S] M log(π_S/π_T) - 1[x~π_S] (1-M) Σ_topk π_T log(π_T/π_S) - β 1[x~π_T] log(π_T/π_S)

    trusted (M=1): OPD policy gradient; outliers (M=0): masked, clipped advantage max(A, c), or
    top-k forward KL (supervised; or its value as the advantage, code-faithful); prefix tokens:
    β · CE, whose gradient is the correct one for tokens sampled from π_T.
    """
    metrics = _Metrics()
    advantage = k1_advantage(x)
    trusted = x.on_policy & trust_mask(x, config)
    outlier = x.on_policy & ~trusted

    loss_trusted = policy_gradient(advantage, x, config)
    if config.outlier_mode == "mask":
        loss_outlier = torch.zeros_like(loss_trusted)
    elif config.outlier_mode == "clip":
        loss_outlier = policy_gradient(advantage.clamp(min=config.clip_floor), x, config)
    elif config.fkl_code_faithful:
        loss_outlier = policy_gradient(-topk_fkl(x, config).detach(), x, config)
    else:
        loss_outlier = topk_fkl(x, config)
    loss_prefix = -config.prefix_beta * x.student_logprobs

    loss = _masked(loss_trusted, trusted) + _masked(loss_outlier, outlier) + \
        _masked(loss_prefix, x.prefix)
    metrics.add("trusted_fraction", trusted.float(), x.on_policy)
    metrics.add("outlier_fraction", outlier.float(), x.on_policy)
    metrics.add("advantage_trusted", advantage, trusted)
    metrics.add("advantage_outlier", advantage, outlier)
    metrics.add("loss_trusted", loss_trusted, trusted)
    metrics.add("loss_outlier", loss_outlier, outlier)
    metrics.add("loss_prefix", loss_prefix, x.prefix)
    return LossOutput(loss, metrics)


def eopd_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """EOPD: PPO-clipped OPD on every on-policy token, plus top-k (k=16) forward KL where the
    teacher's entropy exceeds the threshold (0.8)."""
    metrics = _Metrics()
    uncertain = x.on_policy & (x.teacher_entropy > config.eopd_entropy_threshold)
    loss_pg = policy_gradient(k1_advantage(x), x, config)
    loss_fkl = topk_fkl(x, config, config.eopd_topk)
    loss = _masked(loss_pg, x.on_policy) + _masked(loss_fkl, uncertain)
    metrics.add("high_teacher_entropy_fraction", uncertain.float(), x.on_policy)
    metrics.add("loss_fkl", loss_fkl, uncertain)
    return LossOutput(loss, metrics)


def reopold_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """REOPOLD: clipped reward max(sg(lp_T - lp_S_old), log(λ/(1-λ))) as the advantage, on the
    selected tokens only (`selected`, chosen over the global batch by `token_selection`; the
    trainer averages over them)."""
    metrics = _Metrics()
    trained = x.on_policy & x.selected
    reward = k1_advantage(x)
    loss = _masked(policy_gradient(reward.clamp(min=config.clip_floor), x, config), trained)
    metrics.add("selected_fraction", trained.float(), x.on_policy)
    metrics.add("clipped_reward_fraction", (reward < config.clip_floor).float(), x.on_policy)
    return LossOutput(loss, metrics)


def entropy_opd_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """Entropy-OPD: plain OPD on the selected highest-student-entropy tokens (top 20%)."""
    metrics = _Metrics()
    trained = x.on_policy & x.selected
    loss = _masked(policy_gradient(k1_advantage(x), x, config), trained)
    metrics.add("selected_fraction", trained.float(), x.on_policy)
    return LossOutput(loss, metrics)


def jsd_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """GKD: full-vocabulary generalised JSD(β) at every on-policy position, supervised."""
    metrics = _Metrics()
    loss = _masked(x.jsd, x.on_policy)
    metrics.add("jsd", x.jsd, x.on_policy)
    return LossOutput(loss, metrics)


def fkl_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """Top-k forward KL at every on-policy position (reported to collapse; its value is the
    common `topk_forward_kl` metric)."""
    return LossOutput(_masked(topk_fkl(x, config), x.on_policy), _Metrics())


LOSSES: Dict[str, Callable[[TokenRecord, DistillConfig], LossOutput]] = {
    "opd": opd_loss, "tropd": tropd_loss, "eopd": eopd_loss, "reopold": reopold_loss,
    "reopold-2stage": reopold_loss, "jsd": jsd_loss, "fkl": fkl_loss,
    "entropy-opd": entropy_opd_loss,
}


def needs(config: DistillConfig) -> Needs:
    """The optional inputs `config.method` reads."""
    m = config.method
    if m == "tropd":
        return Needs(topk=config.outlier_mode == "fkl",
                     reverse_kl=config.trust_region == "kl",
                     uniform=config.trust_region == "stochastic")
    return {
        "opd": Needs(),
        "eopd": Needs(topk=True, teacher_entropy=True),
        "reopold": Needs(selection=True),
        "reopold-2stage": Needs(selection=True),
        "entropy-opd": Needs(selection=True),
        "jsd": Needs(jsd=True),
        "fkl": Needs(topk=True),
    }[m]


def compute_loss(x: TokenRecord, config: DistillConfig) -> LossOutput:
    """`config.method`'s per-token loss, with its own metrics and the common ones."""
    out = LOSSES[config.method](x, config)
    return LossOutput(out.per_token, {**_common_metrics(x, config), **out.metrics})
