"""Off-policy guidance (TrOPD, METHOD.md section 2, module C): how much of a teacher response the
student starts from.

The prefix of a teacher response of `L_T` tokens at training step `step` is its first
`floor(alpha(step) * L_T)` tokens, with `alpha(step) = (1 + cos(pi * step / T)) / 2`: the whole
response at step 0, half at T/2, nothing from step T (`anneal_steps`, 200 in the paper) on.
The student continues on-policy after the prefix (`generate(..., prefixes=...)`).
"""

import math
from typing import List, Sequence


def prefix_fraction(step: int, anneal_steps: int) -> float:
    """alpha(step): the fraction of a teacher response used as prefix (0 from `anneal_steps` on)."""
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps must be positive, got {anneal_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return (1.0 + math.cos(math.pi * min(step, anneal_steps) / anneal_steps)) / 2.0


def prefix_length(response_length: int, step: int, anneal_steps: int) -> int:
    """floor(alpha(step) * L_T) tokens."""
    return math.floor(prefix_fraction(step, anneal_steps) * response_length)


def teacher_prefixes(responses: Sequence[Sequence[int]], step: int,
                     anneal_steps: int) -> List[List[int]]:
    """Each teacher response cut to its prefix at `step`."""
    return [list(r[:prefix_length(len(r), step, anneal_steps)]) for r in responses]
