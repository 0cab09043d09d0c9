"""Distillation losses: value and gradient of every method against a hand-written single-process
full-vocabulary reference at TP=1 and TP=2; the TrOPD trust mask follows P_trust in distribution;
each outlier mode does what METHOD.md says."""

import dataclasses
import math

import pytest
import torch

from megatron_tropd.distill.losses import DistillConfig, compute_loss, trust_mask
from megatron_tropd.runtime.testing import merge_reports, run_distributed
from megatron_tropd.tokens import TokenRecord

VOCAB, PADDED, T, K = 300, 512, 24, 20

CONFIGS = {
    "opd": DistillConfig(method="opd"),
    "opd_ppo_clip": DistillConfig(method="opd", ppo_clip=0.2),
    "tropd_fkl": DistillConfig(),
    "tropd_fkl_code_faithful": DistillConfig(fkl_code_faithful=True),
    "tropd_fkl_renormalized": DistillConfig(topk_renormalize=True),
    "tropd_mask": DistillConfig(outlier_mode="mask"),
    "tropd_clip_deterministic": DistillConfig(outlier_mode="clip", trust_region="deterministic",
                                              trust_tau=0.5),
    "tropd_kl_region": DistillConfig(trust_region="kl"),  # δ set to the median KL below
    "eopd": DistillConfig(method="eopd", ppo_clip=0.2, eopd_entropy_threshold=4.5),
    "reopold": DistillConfig(method="reopold"),
    "reopold_2stage": DistillConfig(method="reopold-2stage"),
    "entropy_opd": DistillConfig(method="entropy-opd"),
    "jsd": DistillConfig(method="jsd", jsd_beta=0.3),
    "fkl": DistillConfig(method="fkl"),
}


# --- inside the spawned processes ------------------------------------------------------------------


def _data():
    """Full student/teacher logits and per-token signals, identical on every rank."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(T, PADDED, generator=g) * 2
    teacher = torch.randn(T, PADDED, generator=g) * 2
    student[:, VOCAB:] = teacher[:, VOCAB:] = 30.0  # padding: must be ignored
    lp_s = torch.log_softmax(student[:, :VOCAB].double(), -1)
    lp_t = torch.log_softmax(teacher[:, :VOCAB].double(), -1)
    tokens = torch.multinomial(lp_s.exp(), 1, generator=g)[:, 0]
    t_topk_lp, t_topk_ids = lp_t.topk(K, dim=-1)
    mask = torch.zeros(T, dtype=torch.bool)
    return dict(
        student=student, teacher=teacher, tokens=tokens,
        # the sampler's log-probs, perturbed so ratios differ from one and PPO clipping bites
        old=(lp_s.gather(1, tokens[:, None])[:, 0] + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)).float(),
        lp_t=lp_t.gather(1, tokens[:, None])[:, 0].float(),
        on_policy=torch.cat([~mask[:18], mask[18:]]),  # the rest are teacher-prefix tokens
        prefix=torch.cat([mask[:18], ~mask[18:]]),
        uniform=torch.rand(T, generator=g),
        selected=torch.rand(T, generator=g) < 0.5,
        t_topk_lp=t_topk_lp.float(), t_topk_ids=t_topk_ids,
        t_entropy=-(lp_t.exp() * lp_t).sum(-1).float(),
        t_logprobs=lp_t,
        rkl=(lp_s.exp() * (lp_s - lp_t)).sum(-1),
    )


def _ours(config, d):
    from megatron.core import parallel_state as ps

    from megatron_tropd.distill.inputs import with_student_inputs
    from megatron_tropd.distill.losses import needs
    from megatron_tropd.tokens import TokenRecord

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = PADDED // tp
    cols = slice(rank * local, (rank + 1) * local)
    logits = d["student"][:, cols].clone().requires_grad_(True)
    record = TokenRecord(
        ids=d["tokens"], on_policy=d["on_policy"], old_logprobs=d["old"],
        teacher_logprobs=d["lp_t"], uniform=d["uniform"], selected=d["selected"],
        teacher_topk_logprobs=d["t_topk_lp"], teacher_topk_ids=d["t_topk_ids"].int(),
        teacher_entropy=d["t_entropy"])
    # the teacher's raw logits shard, padded columns included (they must be ignored)
    x = with_student_inputs(record, logits, VOCAB, needs(config), d["teacher"][:, cols],
                            jsd_beta=config.jsd_beta)
    out = compute_loss(x, config)
    n_tokens = (d["on_policy"] | d["prefix"]).sum()
    loss = out.per_token.sum() / n_tokens
    loss.backward()
    return loss.item(), logits.grad, cols


def _reference(config, d):
    """The same objective written directly on full-vocabulary float64 logits."""
    s = d["student"][:, :VOCAB].double().clone().requires_grad_(True)
    lp_full = torch.log_softmax(s, -1)
    lp = lp_full.gather(1, d["tokens"][:, None])[:, 0]
    old, lp_t = d["old"].double(), d["lp_t"].double()
    on, pre = d["on_policy"], d["prefix"]
    adv = lp_t - old
    ratio = torch.exp(lp - old)

    def pg(a):
        loss = -a * ratio
        if config.ppo_clip is not None:
            loss = torch.maximum(loss, -a * ratio.clamp(1 - config.ppo_clip, 1 + config.ppo_clip))
        return loss

    def fkl(k=K):
        lt = d["t_topk_lp"][:, :k].double()
        if config.topk_renormalize:
            lt = lt - torch.logsumexp(lt, -1, keepdim=True)
        ls = lp_full.gather(1, d["t_topk_ids"][:, :k])
        return (lt.exp() * (lt - ls)).sum(-1)

    c = math.log(config.clip_lambda / (1 - config.clip_lambda))
    zero = torch.zeros(T, dtype=torch.float64)
    m = config.method
    if m == "opd":
        per = torch.where(on, pg(adv), zero)
    elif m == "tropd":
        if config.trust_region == "stochastic":
            accept = d["uniform"].double() < torch.minimum(torch.ones(T, dtype=torch.float64),
                                                           lp_t.exp() / old.exp())
        elif config.trust_region == "deterministic":
            accept = lp_t - old >= math.log(config.trust_tau)
        else:
            accept = d["rkl"] <= config.trust_kl_delta
        if config.outlier_mode == "mask":
            out = zero
        elif config.outlier_mode == "clip":
            out = pg(torch.clamp(adv, min=c))
        elif config.fkl_code_faithful:
            out = pg(-fkl().detach())
        else:
            out = fkl()
        per = torch.where(on & accept, pg(adv), zero) + torch.where(on & ~accept, out, zero) + \
            torch.where(pre, -config.prefix_beta * lp, zero)
    elif m == "eopd":
        per = torch.where(on, pg(adv), zero) + \
            torch.where(on & (d["t_entropy"] > config.eopd_entropy_threshold), fkl(16), zero)
    elif m in ("reopold", "reopold-2stage"):
        per = torch.where(on & d["selected"], pg(torch.clamp(adv, min=c)), zero)
    elif m == "entropy-opd":
        per = torch.where(on & d["selected"], pg(adv), zero)
    elif m == "jsd":
        p, q = lp_full.exp(), d["t_logprobs"].exp()
        b = config.jsd_beta
        mix = b * q + (1 - b) * p
        per = torch.where(on, b * (q * (q / mix).log()).sum(-1) + (1 - b) * (p * (p / mix).log()).sum(-1), zero)
    else:  # fkl
        per = torch.where(on, fkl(), zero)
    loss = per.sum() / (on | pre).sum()
    loss.backward()
    return loss.item(), s.grad


def _check(name, d):
    config = CONFIGS[name]
    if config.trust_region == "kl":
        # δ halfway between the two middle KLs, so fp32 vs fp64 rounding cannot flip a token
        middle = d["rkl"][d["on_policy"]].sort().values[8:10].mean().item()
        config = dataclasses.replace(config, trust_kl_delta=middle)
    value, grad, cols = _ours(config, d)
    ref_value, ref_grad = _reference(config, d)
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value)), (value, ref_value)
    expected = torch.zeros(T, PADDED, dtype=torch.float64)
    expected[:, :VOCAB] = ref_grad
    torch.testing.assert_close(grad.double(), expected[:, cols], rtol=1e-5, atol=1e-7)
    assert ref_grad.abs().max() > 0


def _worker():
    d = _data()
    report = {}
    for name in CONFIGS:
        try:
            _check(name, d)
            report[name] = None
        except Exception:  # noqa: BLE001
            import traceback
            report[name] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def reports():
    return {tp: merge_reports(run_distributed(_worker, world_size=tp, tp=tp)) for tp in (1, 2)}


@pytest.mark.parametrize("tp", (1, 2))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_matches_full_vocabulary_reference(reports, name, tp):
    assert reports[tp][name] is None, reports[tp][name]


# --- single-process checks on the token record --------------------------------------------------


def _inputs(n, log_ratio, **extra):
    """A record of on-policy tokens whose lp_T - lp_S_old = log_ratio, ratio exactly one."""
    student = torch.full((n,), -2.0, dtype=torch.float64, requires_grad=True)
    return TokenRecord(ids=torch.zeros(n, dtype=torch.long), student_logprobs=student,
                       old_logprobs=student.detach().clone(), teacher_logprobs=-2.0 + log_ratio,
                       on_policy=torch.ones(n, dtype=torch.bool), **extra)


def test_trust_mask_follows_p_trust_in_distribution():
    """Acceptance rate per bin of lp_T - lp_S_old equals min(1, π_T/π_S_old) within 4 sigma."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([-4.0, -2.0, -1.0, -0.5, -0.1, 0.0, 0.7, 3.0], dtype=torch.float64)
    n = 20000
    log_ratio = levels.repeat_interleave(n)
    x = _inputs(len(log_ratio), log_ratio, uniform=torch.rand(len(log_ratio), generator=g,
                                                              dtype=torch.float64))
    accepted = trust_mask(x, DistillConfig()).double().view(len(levels), n).mean(1)
    expected = torch.clamp(levels.exp(), max=1.0)
    sigma = torch.sqrt(expected * (1 - expected) / n).clamp(min=1e-12)
    assert ((accepted - expected).abs() <= 4 * sigma + 1e-12).all(), (accepted, expected)


def _grads(config, x):
    out = compute_loss(x, config)
    out.per_token.sum().backward()
    return out


def _all_outliers(mode, **kw):
    """Every token untrusted (deterministic region with a τ no ratio reaches)."""
    return DistillConfig(outlier_mode=mode, trust_region="deterministic", trust_tau=1e9, **kw)


def _topk_inputs(n):
    t = torch.log_softmax(torch.randn(n, 4, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(n, 4, dtype=torch.float64), -1).requires_grad_(True)
    return dict(teacher_topk_logprobs=t, student_topk_logprobs=s)


def test_outlier_mask_gives_no_signal():
    x = _inputs(5, torch.full((5,), -3.0, dtype=torch.float64))
    out = _grads(_all_outliers("mask"), x)
    assert torch.equal(out.per_token, torch.zeros(5, dtype=torch.float64))
    assert x.student_logprobs.grad is None or not x.student_logprobs.grad.any()


def test_outlier_clip_floors_the_advantage():
    log_ratio = torch.tensor([-5.0, -1.0, -0.2], dtype=torch.float64)
    x = _inputs(3, log_ratio)
    _grads(_all_outliers("clip"), x)
    # ratio = 1, so ∂L/∂lp_S = -max(A, log(0.2/0.8))
    expected = -torch.clamp(log_ratio, min=math.log(0.25))
    torch.testing.assert_close(x.student_logprobs.grad, expected)


def test_outlier_fkl_is_supervised_on_the_teacher_topk():
    x = _inputs(3, torch.full((3,), -4.0, dtype=torch.float64), **_topk_inputs(3))
    _grads(_all_outliers("fkl"), x)
    # no policy gradient on the sampled token; -π_T(v) on the student's top-k log-probs
    assert x.student_logprobs.grad is None or not x.student_logprobs.grad.any()
    torch.testing.assert_close(x.student_topk_logprobs.grad, -x.teacher_topk_logprobs.exp())


def test_outlier_fkl_code_faithful_writes_the_value_into_the_advantage():
    x = _inputs(3, torch.full((3,), -4.0, dtype=torch.float64), **_topk_inputs(3))
    _grads(_all_outliers("fkl", fkl_code_faithful=True), x)
    t, s = x.teacher_topk_logprobs, x.student_topk_logprobs.detach()
    fkl = (t.exp() * (t - s)).sum(-1)
    torch.testing.assert_close(x.student_logprobs.grad, fkl)  # A = -FKL, ratio 1
    assert x.student_topk_logprobs.grad is None


def test_trusted_tokens_get_plain_opd_and_prefix_tokens_beta_ce():
    x = _inputs(4, torch.tensor([0.5, 0.2, -0.3, 0.0], dtype=torch.float64))
    x.on_policy = torch.tensor([True, True, False, False])
    _grads(DistillConfig(trust_region="deterministic", trust_tau=1.0, outlier_mode="mask"), x)
    # token 0, 1 trusted (log ratio >= 0): -A; tokens 2, 3 prefix: -β
    torch.testing.assert_close(x.student_logprobs.grad,
                               torch.tensor([-0.5, -0.2, -0.001, -0.001], dtype=torch.float64))


def test_reopold_and_entropy_opd_token_selection():
    """Which on-policy tokens each method trains on (one process): REOPOLD the top half by the
    student's entropy; REOPOLD 2-stage before its switch every token whose reward is above the clip
    floor log(0.2/0.8) = -1.386 (no fraction), after it as REOPOLD; Entropy-OPD the top 20%.
    Prefix tokens are never selected."""
    from megatron_tropd.distill.token_selection import counts_selected, select_tokens

    advantage = torch.tensor([-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.3, 1.0, -4.0, 0.2])
    entropy = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.5, 5.0])
    on_policy = torch.tensor([True] * 9 + [False])  # the last is a teacher-prefix token
    record = TokenRecord(ids=torch.zeros(10, dtype=torch.long), on_policy=on_policy,
                         old_logprobs=torch.zeros(10), teacher_logprobs=advantage,
                         student_entropy=entropy)

    def selected(method, step=0, **kw):
        config = DistillConfig(method=method, reopold_stage2_step=5, **kw)
        return select_tokens(config, step, record).nonzero().flatten().tolist()

    top_half = [1, 3, 5, 7, 8]  # entropies 0.9, 0.8, 0.7, 0.6, 0.5 of the 9 on-policy tokens
    assert selected("reopold") == selected("reopold", step=9) == top_half
    assert selected("reopold-2stage", step=4) == [3, 4, 5, 6, 7]  # A > -1.386
    assert selected("reopold-2stage", step=5) == top_half
    assert selected("entropy-opd") == [1, 3]  # ceil(0.2 x 9) = 2
    assert counts_selected(DistillConfig(method="reopold"))
    assert counts_selected(DistillConfig(method="reopold-2stage"))
    assert not counts_selected(DistillConfig(method="entropy-opd"))


def test_importance_ratio_cap_truncates_value_and_gradient():
    """With --importance-ratio-cap C the policy gradient uses min(ratio, C): above the cap the
    value is -A C and the gradient -A C (not -A ratio); below it nothing changes."""
    log_ratio = torch.tensor([0.5, -0.5], dtype=torch.float64)  # ratios 1.649 and 0.607
    student = torch.full((2,), -2.0, dtype=torch.float64, requires_grad=True)
    x = TokenRecord(ids=torch.zeros(2, dtype=torch.long), student_logprobs=student,
                    old_logprobs=student.detach() - log_ratio,
                    teacher_logprobs=student.detach() - log_ratio + 1.0,  # A = 1
                    on_policy=torch.ones(2, dtype=torch.bool))
    out = _grads(DistillConfig(method="opd", importance_ratio_cap=1.2), x)
    expected = -torch.tensor([1.2, math.exp(-0.5)], dtype=torch.float64)
    torch.testing.assert_close(out.per_token.detach(), expected)
    torch.testing.assert_close(student.grad, expected)
