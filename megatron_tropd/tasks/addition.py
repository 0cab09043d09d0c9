"""Multi-digit addition with written carry steps: the built-in verifiable reasoning task.

A problem `a + b` with two n-digit operands is prompted as `Q:a+b=`. The worked solution writes one
step per digit, least significant first, as `da+db+carry=ss;` (ss the two-digit column sum), then
the answer between `A:` and the end of the response:

    Q:9905+7694=   5+4+0=09;0+9+0=09;9+6+0=15;9+7+1=17;A:17599

Every step depends on the previous step's carry, so a model has to get several written steps right
in a row; the answer is checked by exact match (`tasks.verifier`). The alphabet is the 16 symbols
`0-9 + = ; : Q A`.
"""

import dataclasses
import random

from megatron_tropd.errors import UserError

ALPHABET = "0123456789+=;:QA"


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"Q:{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def digits(self) -> int:
        return len(str(max(self.a, self.b)))

    def solution(self) -> str:
        """The worked solution (the SFT response): one carry step per digit, then `A:answer`."""
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total:02d};")
            carry = total // 10
        return "".join(steps) + f"A:{self.answer}"


def random_problem(rng: random.Random, digits: int) -> Problem:
    """Two operands of exactly `digits` digits (no leading zero)."""
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    return Problem(rng.randint(low, high), rng.randint(low, high))


def check_digit_range(min_digits: int, max_digits: int):
    if not 1 <= min_digits <= max_digits:
        raise UserError(f"digit range must satisfy 1 <= min_digits <= max_digits, got "
                        f"{min_digits}..{max_digits}")
