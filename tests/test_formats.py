"""The several-formats addition task: every format's worked solution is right (its steps recomputed
here from the text, its answer verified), a corrupted one is rejected, the generator is
deterministic, the splits disjoint, and the mismatch knob moves exactly the student's rows it
says onto the student's own format."""

import json
import random
import re

import pytest

from megatron_tropd.errors import UserError
from megatron_tropd.tasks import formats
from megatron_tropd.tasks.addition import Problem, random_problem
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG, verify

PROBLEMS = [random_problem(random.Random(i), 2 + i % 4) for i in range(200)] + [
    Problem(9905, 7694), Problem(99, 1), Problem(10, 10)]
STEP = {  # one column: (digit a, digit b, carry in, column sum) from the step's text
    "carry": r"(\d)\+(\d)\+([01])=(\d\d);",
    "checked": r"(\d)\+(\d)\+([01])=(\d\d);",
    "spaced": r"(\d)\+(\d)(?:\+(1))?=(\d{1,2}) c[01];",
    "paren": r"\((\d),(\d),([01])\)>(\d\d)\|",
}


def _columns_written(text, fmt):
    return [(int(a), int(b), int(c or 0), int(t)) for a, b, c, t in re.findall(STEP[fmt], text)]


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_every_format_is_a_correct_worked_solution(fmt):
    for p in PROBLEMS:
        text = formats.solution(p, fmt)
        assert verify(text, p.answer) == CORRECT and formats.format_of(text) == fmt
        # the written columns are the schoolbook addition of the operands' digits
        da, db = str(p.a)[::-1], str(p.b)[::-1]
        carry = 0
        written = _columns_written(text, fmt)
        assert len(written) == max(len(da), len(db))
        for i, (x, y, c, t) in enumerate(written):
            assert (x, y, c) == (int(da[i]) if i < len(da) else 0,
                                 int(db[i]) if i < len(db) else 0, carry)
            assert t == x + y + c
            carry = t // 10
        if fmt == "checked":
            assert f"check {p.a + p.b}-{p.b}={p.a};" in text
    # the addition task's own solution is the carry format
    assert all(formats.solution(p, "carry") == p.solution() for p in PROBLEMS)


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_a_corrupted_solution_is_rejected(fmt):
    p = Problem(9905, 7694)
    text = formats.solution(p, fmt)
    wrong_answer = text[:-1] + str((int(text[-1]) + 1) % 10)
    assert verify(wrong_answer, p.answer) == WRONG
    assert verify(text.rsplit("A:", 1)[0], p.answer) == MALFORMED
    assert formats.format_of(text.replace(";", ",").replace("|", ",")) is None
    with pytest.raises(UserError, match="unknown format 'prose'"):
        formats.solution(p, "prose")


def test_generator_is_deterministic_and_the_splits_disjoint(tmp_path):
    def read(paths):
        return {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}

    first = read(formats.write_task_files(str(tmp_path / "a"), 300, 40, 0.3, seed=5))
    again = read(formats.write_task_files(str(tmp_path / "b"), 300, 40, 0.3, seed=5))
    other = read(formats.write_task_files(str(tmp_path / "c"), 300, 40, 0.3, seed=6))
    assert first == again and first != other
    held = {r["prompt"] for r in first["heldout"]}
    assert len(held) == 40
    for name in ("train_prompts", "teacher_sft", "student_sft"):
        assert not held & {r["prompt"] for r in first[name]}, name
    # the three training files are the same problems in the same order
    prompts = [r["prompt"] for r in first["train_prompts"]]
    assert [r["prompt"] for r in first["teacher_sft"]] == prompts
    assert [r["prompt"] for r in first["student_sft"]] == prompts
    for row in first["teacher_sft"] + first["student_sft"]:
        assert verify(row["response"], row["answer"]) == CORRECT
        assert formats.format_of(row["response"]) == row["format"]


def test_the_teacher_writes_every_teacher_format_and_never_the_students():
    rows = formats.teacher_examples(PROBLEMS * 10, seed=1)
    counts = {fmt: sum(r["format"] == fmt for r in rows) for fmt in formats.FORMATS}
    assert counts[formats.STUDENT_FORMAT] == 0
    for fmt in formats.TEACHER_FORMATS:  # uniform: 1/3 each of 2030 rows, within ~4 sd
        assert abs(counts[fmt] / len(rows) - 1 / 3) < 0.045, counts


def test_the_mismatch_knob_moves_the_students_rows_as_stated():
    problems = PROBLEMS * 10
    by_fraction = {f: formats.student_examples(problems, f, seed=2) for f in (0.0, 0.3, 1.0)}
    assert all(r["format"] == formats.STUDENT_FORMAT for r in by_fraction[0.0])
    assert all(r["format"] in formats.TEACHER_FORMATS for r in by_fraction[1.0])
    share = sum(r["format"] != formats.STUDENT_FORMAT for r in by_fraction[0.3]) / len(problems)
    assert abs(share - 0.3) < 0.045  # binomial sd of 2030 rows: 0.010
    # the same draws at every setting: a row in a teacher format at 0.3 is that row at 1.0, the
    # others are the student's format of the same problem
    for low, high in zip(by_fraction[0.3], by_fraction[1.0]):
        assert low["prompt"] == high["prompt"]
        assert low == high or low["format"] == formats.STUDENT_FORMAT
    with pytest.raises(UserError, match=r"teacher_format_fraction must be in \[0, 1\]"):
        formats.student_examples(problems, 1.5)


def test_tokenizer_corpus_holds_every_format():
    lines = formats.tokenizer_corpus(PROBLEMS[:3])
    assert len(lines) == 3 * len(formats.FORMATS)
    assert {formats.format_of(line.split("=", 1)[1]) for line in lines} == set(formats.FORMATS)


def test_subword_tokenizer_for_the_formats(tmp_path):
    """tools/train_tokenizer.py --task formats: a BPE of the asked size (so top-k 8..16 truncates
    the teacher's distribution) that spells every format exactly, in fewer ids than characters;
    the addition task's stays one piece per character."""
    import importlib.util
    import os

    from megatron_tropd.tokenizer import load_tokenizer

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "train_tokenizer.py")
    spec = importlib.util.spec_from_file_location("train_tokenizer", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.train_tokenizer(str(tmp_path / "formats.model"), task="formats", vocab_size=384)
    tool.train_tokenizer(str(tmp_path / "chars.model"))
    bpe, chars = (load_tokenizer(tmp_path / f"{name}.model") for name in ("formats", "chars"))
    assert bpe.vocab_size == 384
    for p in PROBLEMS[:50]:
        for fmt in formats.FORMATS:
            text = p.prompt + formats.solution(p, fmt)
            ids = bpe.encode(text)
            assert bpe.decode(ids) == text and bpe.unk_id not in ids
            assert len(ids) < 0.8 * len(text), (fmt, len(ids), len(text))
        assert len(chars.encode(p.prompt + p.solution())) == len(p.prompt + p.solution())
