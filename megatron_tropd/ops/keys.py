"""Keyed randomness: random numbers that are functions of their keys (seed, stable sample id, response
position), so a draw does not depend on the tensor-, pipeline- or data-parallel layout, the batch's
slots or padding, or where a run was resumed. The sampler's uniforms and the trust test's come from
here, each with its own seed."""

import torch

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
