"""The built-in addition task: worked solutions, the verifier, seeded generation and splits."""

import json

import pytest

from megatron_tropd.errors import UserError
from megatron_tropd.tasks.addition import Problem
from megatron_tropd.tasks.splits import heldout_problems, train_problems, write_task_files
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG, parse_answer, verify


def test_worked_solution_writes_every_carry_step():
    assert Problem(9905, 7694).solution() == "5+4+0=09;0+9+0=09;9+6+0=15;9+7+1=17;A:17599"
    assert Problem(12, 13).solution() == "2+3+0=05;1+1+0=02;A:25"
    assert Problem(12, 13).prompt == "Q:12+13="


@pytest.mark.parametrize("text, outcome", [
    ("5+4+0=09;0+9+0=09;9+6+0=15;9+7+1=17;A:17599", CORRECT),
    ("A: 17599 ", CORRECT),              # spaces around the answer
    ("A:017599", CORRECT),               # a leading zero names the same number
    ("A:12;A:17599", CORRECT),           # the last answer counts
    ("5+4+0=09;A:17589", WRONG),
    ("A:17599;A:1", WRONG),
    ("5+4+0=09;0+9+0=09;9+6+0=", MALFORMED),  # ran out of tokens before an answer
    ("A:", MALFORMED),
    ("A:17599;", MALFORMED),             # text after the answer
    ("", MALFORMED),
])
def test_verifier(text, outcome):
    assert verify(text, "17599") == outcome


def test_parse_answer():
    assert parse_answer("1+2+0=03;A:3") == "3"
    assert parse_answer("no answer") is None


def test_generator_is_deterministic_and_seeded():
    held = heldout_problems(40, seed=3)
    assert held == heldout_problems(40, seed=3)
    assert held != heldout_problems(40, seed=4)
    assert train_problems(200, held, seed=3) == train_problems(200, held, seed=3)


def test_difficulty_knobs_and_stratified_heldout():
    held = heldout_problems(40, seed=0, min_digits=2, max_digits=5)
    assert [sum(p.digits == d for p in held) for d in (2, 3, 4, 5)] == [10, 10, 10, 10]
    assert len(set(held)) == 40
    assert {p.digits for p in train_problems(100, held, min_digits=3, max_digits=3)} == {3}
    with pytest.raises(UserError, match="cannot draw"):
        heldout_problems(100, min_digits=1, max_digits=1)  # only 81 one-digit problems


def test_splits_never_overlap():
    # one-digit problems: 81 in all, so a train split of 2000 draws every allowed one many times
    held = heldout_problems(30, seed=1, min_digits=1, max_digits=1)
    train = train_problems(2000, held, seed=1, min_digits=1, max_digits=1)
    assert not set(held) & set(train)
    assert len(set(train)) == 81 - 30


def test_task_files(tmp_path):
    paths = write_task_files(str(tmp_path), train=20, heldout=8, seed=0)
    sft = [json.loads(line) for line in open(paths["train_sft"])]
    held = [json.loads(line) for line in open(paths["heldout"])]
    assert len(sft) == 20 and len(held) == 8
    assert all(verify(r["response"], r["answer"]) == CORRECT for r in sft)
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in held}

