"""Vocabulary-parallel primitives against a single-process full-vocabulary PyTorch reference, at
TP=1, 2 and 4, with a padded vocabulary (at TP=4 one rank holds only padding).

One spawned run per TP size executes every check; each check is reported as its own test.
"""

import math

import pytest
import torch

from megatron_tropd.runtime.testing import merge_reports, run_checks, run_distributed

VOCAB = 300      # real vocabulary; padded to 384 (TP=1), 512 (TP=2, TP=4)
SHAPE = (3, 5)   # [batch, seq] rows of logits
TP_SIZES = (1, 2, 4)
RTOL, ATOL = 1e-5, 1e-6


# --- helpers run inside the spawned processes ----------------------------------------------------


def _layout():
    from megatron.core import parallel_state as ps

    from megatron_tropd.models.builder import padded_vocab_size

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = padded_vocab_size(VOCAB, tp) // tp
    return tp, rank, local


def _full_logits(seed, scale=3.0):
    """Deterministic full logits [*SHAPE, 512]; padded columns hold large garbage that must be
    ignored."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*SHAPE, 512, generator=g, dtype=torch.float64) * scale
    full[..., VOCAB:] = 50.0
    return full.float()


def _local(full):
    """This rank's shard (a leaf with grad) of full logits."""
    _, rank, local = _layout()
    return full[..., rank * local:(rank + 1) * local].clone().requires_grad_(True)


def _ref(full):
    """The reference input: real columns only, float64 leaf."""
    return full[..., :VOCAB].double().clone().requires_grad_(True)


def _check_grad(local_leaf, ref_leaf):
    """Local gradient equals the reference gradient's slice, and is zero on padded columns."""
    _, rank, local = _layout()
    start = rank * local
    expected = torch.zeros(local_leaf.shape, dtype=torch.float64)
    n_valid = max(0, min(local, VOCAB - start))
    expected[..., :n_valid] = ref_leaf.grad[..., start:start + n_valid]
    torch.testing.assert_close(local_leaf.grad.double(), expected, rtol=RTOL, atol=ATOL)


def _upstream(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _value_and_grads(ours_fn, ref_fn, n_inputs=1, grad_inputs=(0,)):
    """Compare value and gradients of ours_fn(local shards) vs ref_fn(full references)."""
    fulls = [_full_logits(11 + i) for i in range(n_inputs)]
    locals_ = [_local(f) for f in fulls]
    refs = [_ref(f) for f in fulls]
    for i in range(n_inputs):
        if i not in grad_inputs:
            locals_[i].requires_grad_(False)
            refs[i].requires_grad_(False)
    ours, ref = ours_fn(*locals_), ref_fn(*refs)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=RTOL, atol=ATOL)
    w = _upstream(ref.shape)
    (ours.double() * w).sum().backward()
    (ref * w).sum().backward()
    for i in grad_inputs:
        _check_grad(locals_[i], refs[i])


# --- checks ---------------------------------------------------------------------------------------


def check_log_softmax():
    from megatron_tropd.ops import vocab_parallel as vp

    full = _full_logits(1)
    x, r = _local(full), _ref(full)
    ours, ref = vp.log_softmax(x, VOCAB), torch.log_softmax(r, -1)
    _, rank, local = _layout()
    start = rank * local
    n_valid = max(0, min(local, VOCAB - start))
    torch.testing.assert_close(ours[..., :n_valid].double(), ref[..., start:start + n_valid].detach(),
                               rtol=RTOL, atol=ATOL)
    assert torch.isneginf(ours[..., n_valid:]).all()
    w_full = _upstream(ref.shape)
    (ours[..., :n_valid].double() * w_full[..., start:start + n_valid]).sum().backward()
    (ref * w_full).sum().backward()
    _check_grad(x, r)


def check_token_log_probs():
    from megatron_tropd.ops import vocab_parallel as vp

    ids = torch.randint(0, VOCAB, SHAPE, generator=torch.Generator().manual_seed(3))
    _value_and_grads(lambda x: vp.token_log_probs(x, ids, VOCAB),
                     lambda r: torch.log_softmax(r, -1).gather(-1, ids[..., None])[..., 0])


def check_log_probs_at_ids():
    from megatron_tropd.ops import vocab_parallel as vp

    ids = torch.randint(0, VOCAB, SHAPE + (6,), generator=torch.Generator().manual_seed(4))
    ids[..., 1] = ids[..., 0]  # a repeated id gets both gradients
    _value_and_grads(lambda x: vp.log_probs_at(x, ids, VOCAB),
                     lambda r: torch.log_softmax(r, -1).gather(-1, ids))


def check_entropy():
    from megatron_tropd.ops import vocab_parallel as vp

    def ref(r):
        lp = torch.log_softmax(r, -1)
        return -(lp.exp() * lp).sum(-1)

    _value_and_grads(lambda x: vp.entropy(x, VOCAB), ref)


def check_token_log_probs_and_entropy():
    """The sampler's fused per-step statistics equal the float64 full-vocabulary values."""
    from megatron_tropd.ops import vocab_parallel as vp

    full = _full_logits(12)
    ids = torch.randint(0, VOCAB, SHAPE, generator=torch.Generator().manual_seed(13))
    lp, ent = vp.token_log_probs_and_entropy(_local(full).detach(), ids, VOCAB)
    ref = torch.log_softmax(full[..., :VOCAB].double(), -1)
    torch.testing.assert_close(lp.double(), ref.gather(-1, ids[..., None])[..., 0],
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), rtol=RTOL, atol=ATOL)


def _ref_kl(p, q):
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def check_reverse_kl_both_grads():
    from megatron_tropd.ops import vocab_parallel as vp

    _value_and_grads(lambda s, t: vp.kl_divergence(s, t, VOCAB), _ref_kl, 2, (0, 1))


def check_forward_kl_both_grads():
    from megatron_tropd.ops import vocab_parallel as vp

    _value_and_grads(lambda s, t: vp.kl_divergence(t, s, VOCAB), lambda s, t: _ref_kl(t, s), 2, (0, 1))


def check_kl_student_grad_only():
    from megatron_tropd.ops import vocab_parallel as vp

    _value_and_grads(lambda s, t: vp.kl_divergence(s, t, VOCAB), _ref_kl, 2, (0,))


def _ref_jsd(beta):
    def ref(s, t):
        if beta == 0.0:
            return _ref_kl(t, s)
        if beta == 1.0:
            return _ref_kl(s, t)
        ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
        m = beta * pt + (1 - beta) * ps
        return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)

    return ref


def check_jsd():
    from megatron_tropd.ops import vocab_parallel as vp

    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        _value_and_grads(lambda s, t: vp.jsd(s, t, beta, VOCAB), _ref_jsd(beta), 2, (0, 1))


def check_topk():
    from megatron_tropd.ops import vocab_parallel as vp

    full = _full_logits(5)
    for k in (1, 8, 64):
        values, ids = vp.topk(_local(full), k, VOCAB)
        ref_values, ref_ids = full[..., :VOCAB].topk(k, dim=-1)
        torch.testing.assert_close(values, ref_values)
        assert torch.equal(ids, ref_ids)
        lp, lp_ids = vp.topk_log_probs(_local(full), k, VOCAB)
        ref_lp = torch.log_softmax(full[..., :VOCAB].double(), -1).topk(k, dim=-1).values
        assert torch.equal(lp_ids, ref_ids)
        torch.testing.assert_close(lp.double(), ref_lp, rtol=RTOL, atol=ATOL)


def check_topk_forward_kl():
    """The top-k forward KL of the losses from the student's sharded log-probs at the teacher's
    top-k ids: value and gradient equal the full-vocabulary reference."""
    from megatron_tropd.distill.losses import topk_forward_kl_terms
    from megatron_tropd.ops import vocab_parallel as vp

    k = 16
    teacher = _full_logits(21)
    t_lp, t_ids = vp.topk_log_probs(_local(teacher), k, VOCAB)
    for renormalize in (False, True):
        def ref(s):
            lt = torch.log_softmax(teacher[..., :VOCAB].double(), -1).gather(-1, t_ids)
            if renormalize:
                lt = lt - lt.logsumexp(-1, keepdim=True)
            ls = torch.log_softmax(s, -1).gather(-1, t_ids)
            return (lt.exp() * (lt - ls)).sum(-1)

        _value_and_grads(lambda s: topk_forward_kl_terms(t_lp, vp.log_probs_at(s, t_ids, VOCAB),
                                                          renormalize), ref)


def check_bf16_inputs_match_fp32_math():
    """bf16 shards are reduced in fp32: the value equals the reference on the bf16-rounded logits."""
    from megatron_tropd.ops import vocab_parallel as vp

    s, t = _full_logits(31).bfloat16().float(), _full_logits(32).bfloat16().float()
    ours = vp.kl_divergence(_local(s).bfloat16(), _local(t).bfloat16(), VOCAB)
    torch.testing.assert_close(ours.double(), _ref_kl(_ref(s), _ref(t)).detach(), rtol=2e-2, atol=1e-2)


def check_bf16_logits_give_float32_log_probs():
    """From bf16 shards every log-prob, entropy and divergence comes back in float32, equal to a
    float64 computation on the bf16-rounded logits to float32 precision (bf16 outputs would be
    off by up to 2^-8 relative: -12.79 -> -12.81), and the gradients come back in bf16."""
    from megatron_tropd.ops import vocab_parallel as vp

    s, t = _full_logits(41).bfloat16(), _full_logits(42).bfloat16()
    ids = torch.randint(0, VOCAB, SHAPE, generator=torch.Generator().manual_seed(4))
    topk_ids = torch.randint(0, VOCAB, SHAPE + (6,), generator=torch.Generator().manual_seed(5))
    lp_s, lp_t = (torch.log_softmax(_ref(x.float()), -1) for x in (s, t))
    ps = lp_s.exp()
    mix = torch.logaddexp(lp_s + math.log(0.5), lp_t + math.log(0.5))
    cases = {
        "token_log_probs": (lambda a, b: vp.token_log_probs(a, ids, VOCAB),
                            lp_s.gather(-1, ids[..., None])[..., 0]),
        "log_probs_at": (lambda a, b: vp.log_probs_at(a, topk_ids, VOCAB), lp_s.gather(-1, topk_ids)),
        "entropy": (lambda a, b: vp.entropy(a, VOCAB), -(ps * lp_s).sum(-1)),
        "kl_divergence": (lambda a, b: vp.kl_divergence(a, b, VOCAB), (ps * (lp_s - lp_t)).sum(-1)),
        "jsd": (lambda a, b: vp.jsd(a, b, 0.5, VOCAB),
                0.5 * (lp_t.exp() * (lp_t - mix)).sum(-1) + 0.5 * (ps * (lp_s - mix)).sum(-1)),
    }
    for name, (ours_fn, expected) in cases.items():
        a, b = _local(s.float()).bfloat16().detach().requires_grad_(True), _local(t.float()).bfloat16()
        ours = ours_fn(a, b)
        assert ours.dtype == torch.float32, (name, ours.dtype)
        torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-5, atol=1e-5,
                                   msg=name)
        ours.sum().backward()
        assert a.grad.dtype == torch.bfloat16, name
    _, rank, local = _layout()
    n_valid = max(0, min(local, VOCAB - rank * local))
    full = vp.log_softmax(_local(s.float()).bfloat16(), VOCAB)
    assert full.dtype == torch.float32
    torch.testing.assert_close(full[..., :n_valid].double(),
                               lp_s[..., rank * local:rank * local + n_valid].detach(),
                               rtol=1e-5, atol=1e-5)
    lp, entropy = vp.token_log_probs_and_entropy(_local(s.float()).bfloat16(), ids, VOCAB)
    topk_lp, _ = vp.topk_log_probs(_local(s.float()).bfloat16(), 4, VOCAB)
    assert lp.dtype == entropy.dtype == topk_lp.dtype == torch.float32
    torch.testing.assert_close(topk_lp.double(), lp_s.topk(4, dim=-1).values.detach(), rtol=1e-5,
                               atol=1e-5)


# --- sampling -------------------------------------------------------------------------------------

N_DRAWS = 40000


def _chi2_critical(df, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _sampling_logits():
    """One distribution with ~20 likely tokens and a long tail, repeated N_DRAWS times."""
    g = torch.Generator().manual_seed(9)
    row = torch.randn(512, generator=g) * 0.5 - 4.0
    row[:VOCAB][torch.randperm(VOCAB, generator=g)[:20]] += 4.0
    row[VOCAB:] = 100.0  # padding: must never be sampled
    return row.expand(N_DRAWS, 512).contiguous()


def _assert_goodness_of_fit(ids, probs):
    """Pearson chi-square of sampled counts vs probs, pooling bins of expected count < 5."""
    counts = torch.bincount(ids, minlength=VOCAB)[:VOCAB].double()
    expected = probs * ids.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    assert counts[probs == 0].sum() == 0, "sampled an id of probability zero"
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < _chi2_critical(df), f"chi2={chi2:.1f} over {df} dof"


def _reference_probs(row, temperature, top_k, top_p):
    z = row[:VOCAB].double() / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], -math.inf)
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        sorted_p, order = p.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass strictly before each token
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order] = before < top_p
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def check_sampling_distribution():
    from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
    from megatron_tropd.ops.sampling import sample

    full = _sampling_logits()
    uniforms = uniform_from_keys(sampling_keys(1234, torch.arange(N_DRAWS), 0))
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.6)):
        ids = sample(_local(full).detach(), VOCAB, uniforms, temperature, top_k, top_p)
        _assert_goodness_of_fit(ids, _reference_probs(full[0], temperature, top_k, top_p))


def check_greedy_is_argmax():
    from megatron_tropd.ops.sampling import sample

    full = _full_logits(41)
    ids = sample(_local(full).detach(), VOCAB, None, 0.0)
    assert torch.equal(ids, full[..., :VOCAB].argmax(-1))


def check_topk_errors():
    from megatron_tropd.ops import vocab_parallel as vp

    x = _local(_full_logits(1)).detach()
    with pytest.raises(ValueError, match="top-k needs"):
        vp.topk(x, VOCAB + 1, VOCAB)


CHECKS = [
    check_log_softmax, check_token_log_probs, check_log_probs_at_ids, check_entropy,
    check_token_log_probs_and_entropy,
    check_reverse_kl_both_grads, check_forward_kl_both_grads, check_kl_student_grad_only,
    check_jsd, check_topk, check_topk_forward_kl, check_bf16_inputs_match_fp32_math,
    check_bf16_logits_give_float32_log_probs,
    check_sampling_distribution, check_greedy_is_argmax, check_topk_errors,
]


def _samples_for_invariance():
    """Sampled ids under several settings, with fixed keys (compared across TP sizes)."""
    from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
    from megatron_tropd.ops.sampling import sample

    full = _full_logits(51, scale=1.0)
    uniforms = uniform_from_keys(
        sampling_keys(99, torch.arange(SHAPE[0] * SHAPE[1]).view(SHAPE), 3))
    settings = ((1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.9), (1.3, 50, 0.95))
    return torch.stack([sample(_local(full).detach(), VOCAB, uniforms, *s) for s in settings])


def _worker():
    return run_checks(CHECKS), _samples_for_invariance()


@pytest.fixture(scope="module")
def runs():
    return {tp: run_distributed(_worker, world_size=tp, tp=tp) for tp in TP_SIZES}


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_primitive(runs, check, tp):
    error = merge_reports([report for report, _ in runs[tp]])[check]
    assert error is None, error


def test_sampled_ids_identical_across_tp(runs):
    samples = {tp: [s for _, s in runs[tp]] for tp in TP_SIZES}
    for tp in TP_SIZES:
        for rank_samples in samples[tp]:  # every rank returns the same ids
            assert torch.equal(rank_samples, samples[1][0]), f"TP={tp} sampled different ids"
    # and the ids are not degenerate: different settings and rows give different ids
    assert len(torch.unique(samples[1][0])) > 5
