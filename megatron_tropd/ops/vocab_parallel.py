"""Vocabulary-parallel math on logits sharded over the tensor-parallel group.

Every function takes this rank's logits shard `[..., V/tp]` (columns `[rank*V/tp, (rank+1)*V/tp)`
of the padded vocabulary) and `vocab_size`, the true vocabulary: columns at or past it are padding
and are excluded from every softmax, sum, top-k and sample. No function gathers the vocabulary or
allocates a full-vocabulary tensor; communication is per-row scalars (and k values for top-k).

Gradients are exact: the reductions are `torch.autograd.Function`s whose backward is the gradient of
the *global* value with respect to the *local* logits (no autograd through all-reduce, which would
make gradients tp-times too large), and they recompute softmax in row chunks instead of saving
vocabulary-sized tensors, so the extra memory of forward + backward is about one gradient shard.

Shapes: `logits [..., Vl]` (any leading dims, flattened to rows internally), per-row results `[...]`.
`group=None` means megatron's tensor-model-parallel group. Log-probabilities, entropies and
divergences come back in float32 whatever the logits' dtype (bf16 would round a log-prob of -12.79
to -12.81: a 2% error in exactly the low-probability tokens the trust region judges); gradients
come back in the logits' dtype.
"""

import math

import torch
import torch.distributed as dist

# Elements processed at once inside the fused reductions (4 MiB per fp32 temporary): bounds their
# temporary memory whatever the vocabulary and batch sizes.
CHUNK_ELEMENTS = 2**20


# --- shard layout and communication ---------------------------------------------------------------


def _group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def shard_range(local_vocab: int, vocab_size: int, group=None):
    """(first global id of this shard, number of real, unpadded columns in it)."""
    start = _rank(_group(group)) * local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def _all_reduce(tensor, op, group):
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor, group):
    """Stack of every rank's `tensor` along a new dim 0 (no autograd)."""
    world = _world(group)
    if world == 1:
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.stack(out)


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _row_reduce(x, op: str, empty_value: float):
    """`x.amin/amax(dim=1)`, or `empty_value` per row when this shard has no columns."""
    if x.shape[1] == 0:
        return x.new_full(x.shape[:1], empty_value)
    return getattr(x, op)(dim=1)


def _rows(logits, vocab_size, group):
    """Flatten to rows and keep only the real columns: `(z [N, n_valid], start, n_valid)`."""
    start, n_valid = shard_range(logits.shape[-1], vocab_size, group)
    return logits.reshape(-1, logits.shape[-1])[:, :n_valid], start, n_valid


def _log_normalizer(z, group):
    """Global log-sum-exp per row of sharded `z [N, n_valid]` (no grad): `[N]`."""
    with torch.no_grad():
        m = _row_reduce(z, "amax", -math.inf).float()
        _all_reduce(m, dist.ReduceOp.MAX, group)
        s = torch.zeros_like(m)
        for rows in _row_chunks(*z.shape):
            s[rows] = (z[rows].float() - m[rows, None]).exp().sum(dim=1)
        _all_reduce(s, dist.ReduceOp.SUM, group)
        return m + s.log()


def _grad_buffer(logits, n_valid, dtype=None):
    """A zero gradient for the whole (padded) shard (in `dtype`, default the logits'), and the
    `[N, n_valid]` view of its real columns that backward fills in place (padded columns keep a
    zero gradient)."""
    grad = torch.zeros(logits.shape, dtype=dtype or logits.dtype, device=logits.device)
    return grad, grad.view(-1, logits.shape[-1])[:, :n_valid]


# --- log-softmax --------------------------------------------------------------------------------


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, vocab_size, group):
        z, _, n_valid = _rows(logits, vocab_size, group)
        log_z = _log_normalizer(z, group)
        out = torch.full(logits.shape, -math.inf, dtype=torch.float32, device=logits.device)
        out.view(-1, logits.shape[-1])[:, :n_valid] = z.float() - log_z[:, None]
        ctx.save_for_backward(out)
        ctx.n_valid, ctx.group, ctx.dtype = n_valid, group, logits.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        n_valid = ctx.n_valid
        g = grad_out.reshape(-1, out.shape[-1])[:, :n_valid]
        logp = out.view(-1, out.shape[-1])[:, :n_valid]
        g_sum = _all_reduce(g.float().sum(dim=1), dist.ReduceOp.SUM, ctx.group)
        grad, rows_grad = _grad_buffer(out, n_valid, ctx.dtype)
        rows_grad.copy_(g - logp.exp() * g_sum[:, None])
        return grad, None, None


def log_softmax(logits, vocab_size: int, group=None):
    """Log-probabilities of this shard, `[..., Vl]` float32 (padded columns are -inf)."""
    return _LogSoftmax.apply(logits, vocab_size, _group(group))


def log_normalizer(logits, vocab_size: int, group=None):
    """Global `logsumexp` over the vocabulary, per row `[...]` (no grad)."""
    group = _group(group)
    z, _, _ = _rows(logits, vocab_size, group)
    return _log_normalizer(z, group).view(logits.shape[:-1])


# --- log-probabilities of given ids -------------------------------------------------------------


class _LogProbsAtIds(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, vocab_size, group):
        z, start, n_valid = _rows(logits, vocab_size, group)
        out_shape = ids.shape
        ids = ids.reshape(z.shape[0], -1)
        local = ids - start
        here = (local >= 0) & (local < n_valid)
        local = local.clamp(0, max(n_valid - 1, 0))
        picked = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            picked = torch.where(here, z.gather(1, local).float(), picked)
        _all_reduce(picked, dist.ReduceOp.SUM, group)
        log_z = _log_normalizer(z, group)
        ctx.save_for_backward(logits, log_z, local, here)
        ctx.vocab_size, ctx.n_valid, ctx.group = vocab_size, n_valid, group
        return (picked - log_z[:, None]).view(out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, log_z, local, here = ctx.saved_tensors
        z = logits.reshape(-1, logits.shape[-1])[:, : ctx.n_valid]
        g = grad_out.reshape(local.shape).float()
        g_sum = g.sum(dim=1)
        grad, rows_grad = _grad_buffer(logits, ctx.n_valid)
        for rows in _row_chunks(*z.shape):
            p = (z[rows].float() - log_z[rows, None]).exp()
            rows_grad[rows] = (-p * g_sum[rows, None]).to(logits.dtype)
        if ctx.n_valid > 0:
            # d log p_i / d z_j = 1[i=j] - p_j: add g back at the ids held by this shard.
            rows_grad.scatter_add_(1, local, torch.where(here, g, 0.0).to(logits.dtype))
        return grad, None, None, None


def log_probs_at(logits, ids, vocab_size: int, group=None):
    """Log-probabilities at global `ids [..., k]`: `[..., k]`, differentiable in `logits`."""
    return _LogProbsAtIds.apply(logits, ids, vocab_size, _group(group))


def token_log_probs(logits, token_ids, vocab_size: int, group=None):
    """Log-probability of one global id per row, `token_ids [...]` -> `[...]`."""
    return log_probs_at(logits, token_ids.unsqueeze(-1), vocab_size, group).squeeze(-1)


def token_log_probs_and_entropy(logits, token_ids, vocab_size: int, group=None):
    """`(token_log_probs(...), entropy(...))` in float32 without gradient, sharing one
    log-normaliser and one all-reduce: what a sampler records per step."""
    group = _group(group)
    with torch.no_grad():
        z, start, n_valid = _rows(logits, vocab_size, group)
        log_z = _log_normalizer(z, group)
        sums = torch.zeros(2, z.shape[0], dtype=torch.float32, device=logits.device)
        local = token_ids.reshape(-1, 1) - start
        here = (local >= 0) & (local < n_valid)
        if n_valid > 0:
            picked = z.gather(1, local.clamp(0, n_valid - 1)).float()
            sums[0] = torch.where(here, picked, 0.0).squeeze(1)
        for rows in _row_chunks(*z.shape):
            lp = z[rows].float() - log_z[rows, None]
            sums[1, rows] = -(lp.exp() * lp).sum(dim=1)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        shape = logits.shape[:-1]
        return (sums[0] - log_z).view(shape), sums[1].view(shape)


# --- full-vocabulary reductions: entropy, KL, JSD -----------------------------------------------
#
# A reduction over the vocabulary is `value = Σ_v f(p, q)_v` per row, with p, q the softmax of the
# two logit shards. Its gradient through the softmax is `∂value/∂z_p = A_p - p * Σ_v A_p` with
# `A_p = p ⊙ ∂value/∂p` (likewise for q). Each reduction below supplies, per chunk of rows, the
# elementwise value terms and A_p, A_q; forward all-reduces Σ value, Σ A_p and Σ A_q in one call,
# backward recomputes A in chunks and needs no communication.


def _entropy_terms(lp, lq, p, q):
    """H(P) = -Σ p log p."""
    a_p = -p * lp
    return a_p, a_p, None


def _kl_terms(lp, lq, p, q):
    """KL(P||Q) = Σ p (log p - log q); ∂/∂q_v = -p_v/q_v so A_q = -p."""
    a_p = p * (lp - lq)
    return a_p, a_p, -p


def _jsd_terms(beta):
    """JSD(β) = β KL(Q||M) + (1-β) KL(P||M), M = β Q + (1-β) P (P student, Q teacher)."""
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)

    def terms(lp, lq, p, q):
        lm = torch.logaddexp(lp + log_1m_beta, lq + log_beta)
        a_p = (1 - beta) * p * (lp - lm)
        a_q = beta * q * (lq - lm)
        return a_p + a_q, a_p, a_q

    return terms


class _VocabReduction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, terms, p_logits, q_logits, vocab_size, group):
        zp, _, n_valid = _rows(p_logits, vocab_size, group)
        zq = None if q_logits is None else _rows(q_logits, vocab_size, group)[0]
        log_zp = _log_normalizer(zp, group)
        log_zq = None if zq is None else _log_normalizer(zq, group)
        sums = torch.zeros(3, zp.shape[0], dtype=torch.float32, device=p_logits.device)
        for rows, lp, lq, p, q in _chunked_log_probs(zp, zq, log_zp, log_zq):
            value, a_p, a_q = terms(lp, lq, p, q)
            sums[0, rows] = value.sum(dim=1)
            sums[1, rows] = a_p.sum(dim=1)
            if a_q is not None:
                sums[2, rows] = a_q.sum(dim=1)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        ctx.terms, ctx.n_valid, ctx.group = terms, n_valid, group
        ctx.save_for_backward(p_logits, q_logits, log_zp, log_zq, sums[1], sums[2])
        return sums[0].view(p_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        p_logits, q_logits, log_zp, log_zq, sum_a_p, sum_a_q = ctx.saved_tensors
        n_valid = ctx.n_valid
        zp = p_logits.reshape(-1, p_logits.shape[-1])[:, :n_valid]
        zq = None if q_logits is None else q_logits.reshape(-1, q_logits.shape[-1])[:, :n_valid]
        need_p, need_q = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        g = grad_out.reshape(-1).float()
        grad_p, rows_p = _grad_buffer(p_logits, n_valid) if need_p else (None, None)
        grad_q, rows_q = _grad_buffer(q_logits, n_valid) if need_q else (None, None)
        for rows, lp, lq, p, q in _chunked_log_probs(zp, zq, log_zp, log_zq):
            _, a_p, a_q = ctx.terms(lp, lq, p, q)
            gr = g[rows, None]
            if need_p:
                rows_p[rows] = gr * (a_p - p * sum_a_p[rows, None])
            if need_q:
                rows_q[rows] = gr * (a_q - q * sum_a_q[rows, None])
        return None, grad_p, grad_q, None, None


def _chunked_log_probs(zp, zq, log_zp, log_zq):
    """Per chunk of rows: (rows, log p, log q, p, q) in fp32 (q parts None without zq)."""
    for rows in _row_chunks(*zp.shape):
        lp = zp[rows].float() - log_zp[rows, None]
        lq = None if zq is None else zq[rows].float() - log_zq[rows, None]
        yield rows, lp, lq, lp.exp(), None if lq is None else lq.exp()


def entropy(logits, vocab_size: int, group=None):
    """Entropy of the full-vocabulary distribution per row: `[...]`."""
    return _VocabReduction.apply(_entropy_terms, logits, None, vocab_size, _group(group))


def kl_divergence(p_logits, q_logits, vocab_size: int, group=None):
    """Full-vocabulary KL(P||Q) per row, differentiable in both logit shards.

    Reverse KL of distillation is `kl_divergence(student, teacher)`, forward KL
    `kl_divergence(teacher, student)`.
    """
    return _VocabReduction.apply(_kl_terms, p_logits, q_logits, vocab_size, _group(group))


def jsd(student_logits, teacher_logits, beta: float, vocab_size: int, group=None):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), per row:

        JSD(β) = β KL(T||M) + (1-β) KL(S||M),   M = β T + (1-β) S,

    with the endpoints as GKD/TRL define them: β=0 is forward KL(T||S), β=1 reverse KL(S||T).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_divergence(teacher_logits, student_logits, vocab_size, group)
    if beta == 1.0:
        return kl_divergence(student_logits, teacher_logits, vocab_size, group)
    return _VocabReduction.apply(
        _jsd_terms(beta), student_logits, teacher_logits, vocab_size, _group(group)
    )


# --- top-k ----------------------------------------------------------------------------------------


def _topk_rows(z, start: int, k: int, group):
    """Global top-k of sharded rows `z [N, n_valid]`: (values [N, k], global ids [N, k])."""
    local_k = min(k, z.shape[1])
    values = torch.full((z.shape[0], k), -math.inf, dtype=z.dtype, device=z.device)
    ids = torch.full((z.shape[0], k), -1, dtype=torch.long, device=z.device)
    if local_k > 0:
        v, i = z.topk(local_k, dim=1)
        values[:, :local_k], ids[:, :local_k] = v, i + start
    all_values = _all_gather(values, group).permute(1, 0, 2).reshape(z.shape[0], -1)
    all_ids = _all_gather(ids, group).permute(1, 0, 2).reshape(z.shape[0], -1)
    top_values, where = all_values.topk(k, dim=1)
    return top_values, all_ids.gather(1, where)


@torch.no_grad()
def topk(logits, k: int, vocab_size: int, group=None):
    """Global top-k of the logits across shards: `(values [..., k], global ids [..., k])`, sorted
    descending. No grad; k values and ids per rank are all-gathered, never the vocabulary."""
    group = _group(group)
    if not 0 < k <= vocab_size:
        raise ValueError(f"top-k needs 0 < k <= vocab size ({vocab_size}), got {k}")
    z, start, _ = _rows(logits, vocab_size, group)
    values, ids = _topk_rows(z, start, k, group)
    shape = logits.shape[:-1] + (k,)
    return values.view(shape), ids.view(shape)


@torch.no_grad()
def topk_log_probs(logits, k: int, vocab_size: int, group=None):
    """Global top-k log-probabilities (normalised over the full vocabulary) and their global ids."""
    values, ids = topk(logits, k, vocab_size, group)
    log_z = log_normalizer(logits, vocab_size, group)
    return values.float() - log_z.unsqueeze(-1), ids


def topk_forward_kl(student_logits, teacher_topk_log_probs, teacher_topk_ids, vocab_size: int,
                    renormalize: bool = False, group=None):
    """Forward KL restricted to the teacher's top-k ids, per row (see `topk_forward_kl_terms`);
    the student's log-probs at those ids come from its sharded logits, with gradient."""
    student_lp = log_probs_at(student_logits, teacher_topk_ids, vocab_size, group)
    return topk_forward_kl_terms(teacher_topk_log_probs, student_lp, renormalize)


def topk_forward_kl_terms(teacher_topk_log_probs, student_topk_log_probs, renormalize: bool = False):
    """Σ_{v ∈ TopK(π_T)} π_T(v) (log π_T(v) - log π_S(v)) from log-probs at the teacher's top-k ids
    `[..., k]` (both normalised over the full vocabulary). With `renormalize` the teacher's k
    probabilities are renormalised to sum to one first. Gradient flows through the student's."""
    teacher_lp = teacher_topk_log_probs.float()
    if renormalize:
        teacher_lp = teacher_lp - teacher_lp.logsumexp(dim=-1, keepdim=True)
    return (teacher_lp.exp() * (teacher_lp - student_topk_log_probs.float())).sum(dim=-1)


# --- sampling ---------------------------------------------------------------------------------------
#
# Inverse-CDF sampling: one uniform u per row, drawn from the row's key, picks the first id, in global
# id order, at which the cumulative probability exceeds u. Each rank sums its own shard's mass
# (relative to its own maximum logit) and one (maximum, mass) pair per row is all-gathered, so every
# rank knows which shard holds the draw; that shard finds the id in its own cumulative sum, and the
# ids are all-reduced. The draw depends on (row key, the distribution) only, not on how the
# vocabulary is sharded: the same keys give the same ids at TP=1, 2, 4 (up to float64 rounding of
# the cumulative sums, which could move a draw within about 1e-16 of a boundary between two ids).

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                               0x94D049BB133111EB))


def _shr(x, s: int):
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x):
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic): a well-mixed 64-bit hash."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sampling_keys(seed: int, row_ids, position):
    """One int64 key per row from a seed, stable row ids (e.g. global sample index) and the decode
    position (an int or a per-row tensor). Equal inputs give equal keys on every rank and layout."""
    row_ids = torch.as_tensor(row_ids, dtype=torch.long)
    position = torch.as_tensor(position, dtype=torch.long, device=row_ids.device)
    base = _splitmix64(torch.tensor(seed & _MASK64 if seed >= 0 else seed, dtype=torch.long))
    return _splitmix64(_splitmix64(base.to(row_ids.device) + position) + row_ids)


def uniform_from_keys(keys):
    """A float64 uniform draw in (0, 1) per int64 key (53 bits of its hash): random numbers that
    depend only on their keys, not on how the work is split over ranks or micro-batches."""
    return (_shr(_splitmix64(keys), 11).double() + 0.5) * 2.0**-53


def _inverse_cdf(z, start: int, u, group):
    """One global id per row of sharded scores `z [N, n]` (float64; -inf = excluded), drawn from
    softmax(z) by the uniforms `u [N]`: the first id whose cumulative probability exceeds u."""
    n_rows, n = z.shape
    top = torch.full((n_rows,), -math.inf, dtype=z.dtype, device=z.device)  # -inf: no mass here
    shift = mass = torch.zeros(n_rows, dtype=z.dtype, device=z.device)
    if n > 0:
        top = z.max(dim=1).values
        shift = torch.where(torch.isfinite(top), top, 0.0)
        cumulative = (z - shift[:, None]).exp().cumsum(dim=1)
        mass = cumulative[:, -1]
    if _world(group) == 1:
        local = u * mass  # one shard holds the whole vocabulary
    else:
        local, mine = _draw_in_shard(top, shift, mass, u, group)
    # strictly below the shard's total, so the first id above it has probability > 0
    local = torch.minimum(local, torch.nextafter(mass, torch.zeros_like(mass)))
    ids = torch.full((n_rows,), -1, dtype=torch.long, device=z.device)
    if n > 0:
        ids = torch.searchsorted(cumulative, local[:, None], right=True)[:, 0] + start
    if _world(group) == 1:
        return ids
    return _all_reduce(torch.where(mine, ids, -1), dist.ReduceOp.MAX, group)


def _draw_in_shard(top, shift, mass, u, group):
    """Which shard holds each row's draw, and where in that shard's cumulative mass (in its own
    units `exp(z - shift)`): `(position [N], this shard holds it [N] bool)`. From one all-gather
    of every shard's (largest score, mass) per row."""
    tops, masses = _all_gather(torch.stack([top, mass]), group).unbind(1)  # [world, N] each
    largest = tops.max(dim=0).values
    masses = masses * (tops - largest).exp()  # every shard's mass on one scale
    edges = masses.cumsum(dim=0)  # the same on every rank: it is made of all-gathered values
    target = u.to(masses.dtype) * edges[-1]
    # the shard holding the draw: the first whose upper edge exceeds it (a draw that rounding put
    # at the very top goes to the last shard with any mass)
    owner = (edges <= target).sum(dim=0)
    last_with_mass = masses.shape[0] - 1 - (masses > 0).flip(0).int().argmax(dim=0)
    owner = torch.minimum(owner, last_with_mass)
    below = torch.where(owner > 0, edges.gather(0, (owner - 1).clamp(min=0)[None])[0], 0.0)
    local = ((target - below) * (largest - shift).exp()).clamp(min=0.0)
    return local, owner == _rank(group)


def _global_argmax(scores, start: int, group):
    """Global argmax id per row of sharded `scores [N, n]`; ties go to the smallest id."""
    n_rows = scores.shape[0]
    if scores.shape[1] > 0:
        best, where = scores.max(dim=1)
        best_id = where + start
    else:
        best = torch.full((n_rows,), -math.inf, dtype=scores.dtype, device=scores.device)
        best_id = torch.zeros(n_rows, dtype=torch.long, device=scores.device)
    all_best, all_ids = _all_gather(best, group), _all_gather(best_id, group)
    top = all_best.max(dim=0).values
    return all_ids.masked_fill(all_best != top, torch.iinfo(torch.long).max).min(dim=0).values


def _nucleus_floor(lp, top_p: float, group, max_iters: int = 64):
    """Per row, the largest log-prob threshold t with Σ_{lp_v >= t} p_v >= top_p: keeping
    `lp >= t` keeps the smallest most-probable set of mass >= top_p (the boundary token included).
    Found by bisection on all-reduced masses, so the vocabulary is never sorted or gathered."""
    p = lp.exp()
    finite = torch.isfinite(lp)
    lo = _row_reduce(torch.where(finite, lp, math.inf), "amin", math.inf)
    hi = _row_reduce(torch.where(finite, lp, -math.inf), "amax", -math.inf)
    _all_reduce(lo, dist.ReduceOp.MIN, group)
    _all_reduce(hi, dist.ReduceOp.MAX, group)
    hi = hi + 1.0  # mass(lp >= hi) = 0 < top_p; mass(lp >= lo) = 1 >= top_p
    for _ in range(max_iters):
        mid = (lo + hi) / 2
        mass = _all_reduce(torch.where(lp >= mid[:, None], p, 0.0).sum(dim=1), dist.ReduceOp.SUM,
                           group)
        enough = mass >= top_p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
        if (hi - lo).max() < 1e-12:  # identical on every rank: all inputs were all-reduced
            break
    return lo


@torch.no_grad()
def sample(logits, vocab_size: int, uniforms, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, group=None):
    """Sample one global id per row from sharded logits, never gathering the vocabulary.

    Args:
        logits: this rank's shard `[..., Vl]`.
        uniforms: float64 `[...]` in (0, 1), one draw per row, the same on every rank (see
            `uniform_from_keys`); the same draws give the same ids whatever the tensor-parallel
            size. Unused when greedy.
        temperature: 0 means greedy (argmax, ties to the smallest id).
        top_k: keep only the k most likely ids (0 = all).
        top_p: keep the smallest most-likely set of probability >= top_p (1.0 = all).
    The settings are checked once, by `rollout.generate.check_sampling`.
    Returns: global ids `[...]` (int64).
    """
    group = _group(group)
    z, start, n_valid = _rows(logits, vocab_size, group)
    if temperature == 0:
        return _global_argmax(z, start, group).view(logits.shape[:-1])
    z = z.double() if temperature == 1.0 else z.double() / temperature
    if 0 < top_k < vocab_size:
        kth = _topk_rows(z, start, top_k, group)[0][:, -1]
        z = z.masked_fill(z < kth[:, None], -math.inf)  # ties with the k-th value are kept
    if top_p < 1.0:
        lp = z - _log_normalizer(z, group)[:, None].double()
        z = z.masked_fill(lp < _nucleus_floor(lp, top_p, group)[:, None], -math.inf)
    return _inverse_cdf(z, start, uniforms.reshape(-1).to(z.device), group).view(logits.shape[:-1])
