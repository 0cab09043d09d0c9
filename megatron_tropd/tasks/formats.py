"""Addition written several ways: the task variant whose teacher and student disagree.

The problems are the addition task's (`tasks.addition`, the same prompts `Q:a+b=` and splits);
the worked solution can be written in several formats, each ending in `A:<answer>` so that one
verifier (`tasks.verifier`) checks them all:

    carry     5+4+0=09;0+9+0=09;9+6+0=15;9+7+1=17;A:17599       (the addition task's own)
    spaced    5+4=9 c0;0+9=9 c0;9+6=15 c1;9+7+1=17 c1;A:17599    (the carry after each column)
    checked   5+4+0=09;0+9+0=09;9+6+0=15;9+7+1=17;check 17599-7694=9905;A:17599
    paren     (5,4,0)>09|(0,9,0)>09|(9,6,0)>15|(9,7,1)>17|A:17599  (the student's own)

The teacher is trained on the `TEACHER_FORMATS`, one drawn at random per example, so its
distribution has real entropy where a format is chosen. The student's SFT data holds a teacher
format with probability `teacher_format_fraction` (the mismatch knob: 1.0 matched, 0.0 mismatched)
and `STUDENT_FORMAT`, which the teacher never writes, otherwise: on-policy, a mismatched student's
format tokens are ones the teacher finds unlikely, the regime where the paper says OPD's K1
advantage misleads. `format_of` tells which format a response is written in (for measuring how
far distillation moves the student onto the teacher's formats). `write_task_files` writes the data
files (tools/make_toy_models.py --task formats calls it).
"""

import os
import random
import re

from megatron_tropd.errors import UserError
from megatron_tropd.tasks.addition import Problem
from megatron_tropd.tasks.splits import heldout_problems, train_problems, write_jsonl

TEACHER_FORMATS = ("carry", "spaced", "checked")
STUDENT_FORMAT = "paren"
FORMATS = TEACHER_FORMATS + (STUDENT_FORMAT,)
# Offsets that keep the format draws' random streams apart from each other and from the splits'.
_TEACHER_STREAM, _STUDENT_STREAM = 0x54464D54, 0x53464D54


def _columns(problem: Problem):
    """(digit of a, digit of b, carry in, column sum) per column, least significant first."""
    da, db = str(problem.a)[::-1], str(problem.b)[::-1]
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        yield x, y, carry, total
        carry = total // 10


def solution(problem: Problem, fmt: str) -> str:
    """The worked solution of `problem` in format `fmt` (one of `FORMATS`)."""
    columns = list(_columns(problem))
    if fmt in ("carry", "checked"):
        text = "".join(f"{x}+{y}+{c}={t:02d};" for x, y, c, t in columns)
        if fmt == "checked":
            text += f"check {problem.answer}-{problem.b}={problem.a};"
    elif fmt == "spaced":
        text = "".join(f"{x}+{y}{f'+{c}' if c else ''}={t} c{t // 10};" for x, y, c, t in columns)
    elif fmt == "paren":
        text = "".join(f"({x},{y},{c})>{t:02d}|" for x, y, c, t in columns)
    else:
        raise UserError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    return text + f"A:{problem.answer}"


_GRAMMARS = {
    "carry": re.compile(r"(\d\+\d\+[01]=\d\d;)+A:\d+"),
    "spaced": re.compile(r"(\d\+\d(\+1)?=\d{1,2} c[01];)+A:\d+"),
    "checked": re.compile(r"(\d\+\d\+[01]=\d\d;)+check \d+-\d+=\d+;A:\d+"),
    "paren": re.compile(r"(\(\d,\d,[01]\)>\d\d\|)+A:\d+"),
}


def format_of(response: str):
    """The format whose grammar `response` follows (steps and answer, not their arithmetic), or
    None."""
    return next((fmt for fmt, grammar in _GRAMMARS.items() if grammar.fullmatch(response)), None)


def teacher_examples(problems: list[Problem], seed: int = 0) -> list[dict]:
    """The teacher's SFT rows: each problem in a teacher format drawn uniformly."""
    rng = random.Random(seed + _TEACHER_STREAM)
    return [_row(p, rng.choice(TEACHER_FORMATS)) for p in problems]


def student_examples(problems: list[Problem], teacher_format_fraction: float,
                     seed: int = 0) -> list[dict]:
    """The student's SFT rows: a teacher format (drawn uniformly) with probability
    `teacher_format_fraction`, the student's own format otherwise."""
    if not 0.0 <= teacher_format_fraction <= 1.0:
        raise UserError(f"teacher_format_fraction must be in [0, 1], got "
                        f"{teacher_format_fraction}")
    rng = random.Random(seed + _STUDENT_STREAM)
    rows = []
    for p in problems:
        in_teacher_format = rng.random() < teacher_format_fraction
        fmt = rng.choice(TEACHER_FORMATS)  # drawn either way: the knob changes nothing else
        rows.append(_row(p, fmt if in_teacher_format else STUDENT_FORMAT))
    return rows


def _row(problem: Problem, fmt: str) -> dict:
    return {"prompt": problem.prompt, "response": solution(problem, fmt),
            "answer": problem.answer, "format": fmt}


def tokenizer_corpus(problems: list[Problem]) -> list[str]:
    """Lines for a subword tokenizer: every problem in every format (so no format is spelled
    out of characters the others never need)."""
    return [p.prompt + solution(p, fmt) for p in problems for fmt in FORMATS]


def write_task_files(output_dir: str, train: int, heldout: int, teacher_format_fraction: float,
                     seed: int = 0, min_digits: int = 2, max_digits: int = 5) -> dict:
    """train_prompts.jsonl, teacher_sft.jsonl, student_sft.jsonl and heldout.jsonl in
    `output_dir` (the splits of `tasks.splits`: no held-out problem is trained on); returns the
    paths."""
    held = heldout_problems(heldout, seed, min_digits, max_digits)
    trained = train_problems(train, held, seed, min_digits, max_digits)
    rows = {
        "train_prompts": [{"prompt": p.prompt, "answer": p.answer} for p in trained],
        "teacher_sft": teacher_examples(trained, seed),
        "student_sft": student_examples(trained, teacher_format_fraction, seed),
        "heldout": [{"prompt": p.prompt, "answer": p.answer} for p in held],
    }
    paths = {name: os.path.join(output_dir, f"{name}.jsonl") for name in rows}
    for name, records in rows.items():
        write_jsonl(paths[name], records)
    return paths

