"""The verifier: the final answer parsed from free text, checked by exact match.

The answer is the digits after the last `A:` of the text (spaces allowed around them), which must be
the end of the text. Outcomes: `correct`, `wrong` (an answer, not the right one), `malformed` (no
answer to read: no `A:`, no digits after it, or text after the digits).
"""

import re

CORRECT, WRONG, MALFORMED = "correct", "wrong", "malformed"

_FINAL_ANSWER = re.compile(r"A:\s*(\d+)\s*$")


def parse_answer(text: str):
    """The final answer in `text` as a digit string, or None when there is none to read."""
    last = text.rfind("A:")
    if last < 0:
        return None
    match = _FINAL_ANSWER.match(text, last)
    return match.group(1) if match else None


def verify(text: str, answer: str) -> str:
    """`correct`, `wrong` or `malformed` for a response `text` to a problem with `answer`."""
    parsed = parse_answer(text)
    if parsed is None:
        return MALFORMED
    # int(): an answer written with a leading zero names the same number
    return CORRECT if int(parsed) == int(answer) else WRONG
