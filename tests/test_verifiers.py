"""The verifier registry: the `math` verifier (math-verify, under a timeout), `exact`, `addition`,
a user's own `module:function`, and the errors for names that name no verifier."""

import importlib.util
import threading
import time

import pytest

from megatron_tropd.errors import UserError
from megatron_tropd.tasks import verifiers
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG
from megatron_tropd.tasks.verifiers import (MATH_TIMEOUT_S, VERIFIER_NAMES, VerifierError,
                                            get_verifier, verify_math)

# Expressions that keep sympy busy for good (each runs over 20 s without a timeout).
PATHOLOGICAL = [r"The answer is \boxed{(10^{10})!}", r"\boxed{10^{10^{10}}}"]

MATH_CASES = [
    # boxed and unboxed answers
    (r"The sum is \boxed{5}.", "5", CORRECT),
    ("The answer is 5", "5", CORRECT),
    ("So x = 7", "7", CORRECT),
    (r"The answer is $\frac{3}{4}$.", "0.75", CORRECT),
    (r"$$\frac{1}{2}$$", "0.5", CORRECT),
    # fractions, decimals and a/b
    (r"\boxed{\frac{1}{2}}", "0.5", CORRECT),
    (r"\boxed{0.5}", r"\frac{1}{2}", CORRECT),
    (r"\boxed{1/2}", r"\frac{1}{2}", CORRECT),
    ("The answer is 1/2", "0.5", CORRECT),
    (r"\boxed{.5}", "0.5", CORRECT),
    # LaTeX spacing and variants
    (r"\boxed{\frac {1} {2}}", "1/2", CORRECT),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", CORRECT),
    (r"\boxed{\tfrac{3}{4}}", "0.75", CORRECT),
    (r"\boxed{\frac12}", "0.5", CORRECT),  # TeX shorthand
    # negative numbers
    (r"\boxed{-3}", "-3", CORRECT),
    (r"\boxed{-3}", "3", WRONG),
    (r"\boxed{\frac{-1}{2}}", r"-\frac12", CORRECT),
    (r"\boxed{-0.5}", "0.5", WRONG),
    # intervals
    (r"\boxed{(1, 2]}", "(1, 2]", CORRECT),
    (r"\boxed{\left(1, 2\right]}", "$(1,2]$", CORRECT),
    (r"\boxed{(1, 2)}", "(1, 2]", WRONG),
    (r"\boxed{(-\infty, 3)}", r"(-\infty, 3)", CORRECT),
    # sets, in any order
    (r"\boxed{\{1,2\}}", r"\{2,1\}", CORRECT),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", WRONG),
    (r"The answer is $x=2$ or $x=3$", r"\{2,3\}", CORRECT),
    # units: math-verify drops them, so `5 cm` and `5` agree, but `5 m` is not `500 cm`
    (r"\boxed{5 \text{ cm}}", "5", CORRECT),
    ("The length is 5 cm", "5", CORRECT),
    (r"\boxed{5}", r"5\text{ cm}", CORRECT),
    (r"\boxed{5 \text{ m}}", r"500 \text{ cm}", WRONG),
    # percentages: math-verify takes 50% as 0.5 and also as 50
    (r"\boxed{50\%}", "0.5", CORRECT),
    (r"\boxed{50}", r"50\%", CORRECT),
    ("The answer is 50%", r"50\%", CORRECT),
    # wrong answers that share digits
    (r"\boxed{12}", "21", WRONG),
    ("The answer is 12.", "21", WRONG),
    (r"\boxed{0.55}", "0.5", WRONG),
    (r"\boxed{0.5}", "0.55", WRONG),
    # malformed LaTeX: unbalanced braces, an empty box, a fraction that does not parse
    (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", MALFORMED),
    (r"\boxed{\frac{1}{", r"\frac{1}{2}", MALFORMED),
    (r"\boxed{}", "5", MALFORMED),
    (r"\boxed{\frac{1}{}}", r"\frac{1}{2}", MALFORMED),
    (r"$\frac{1}{$", r"\frac{1}{2}", MALFORMED),
    (r"\boxed{\frac{1}{2}}}", r"\frac{1}{2}", CORRECT),  # a stray closing brace after the box
    # no answer at all
    ("I don't know.", "5", MALFORMED),
    ("", "5", MALFORMED),
    # a boxed answer followed by more text: the box counts
    (r"\boxed{4} and then I double-checked, it is 3", "4", CORRECT),
    (r"\boxed{3}. Therefore 4", "3", CORRECT),
    # several boxed answers: the last counts
    (r"First \boxed{3}, but actually \boxed{4}", "4", CORRECT),
    (r"First \boxed{4}, but actually \boxed{3}", "4", WRONG),
    # $...$ in the gold answer
    (r"\boxed{2}", "$2$", CORRECT),
    (r"\boxed{\frac{1}{2}}", r"$\frac{1}{2}$", CORRECT),
    # sqrt and pi
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt2}{2}", CORRECT),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", CORRECT),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", CORRECT),
    (r"\boxed{6.28318531}", r"2\pi", CORRECT),  # equal to 6 decimals
    (r"\boxed{6.2832}", r"2\pi", WRONG),
    # expressions and equations
    (r"\boxed{(x+1)^2}", "x^2+2x+1", CORRECT),
    (r"\boxed{x = 3}", "3", CORRECT),
    (r"\boxed{1,000}", "1000", CORRECT),
]


@pytest.fixture(scope="module")
def math():
    """The `math` verifier with its worker already started, so no check's time includes that."""
    verify = get_verifier("math")
    assert verify(r"\boxed{1}", "1") == CORRECT
    return verify


def test_math_table(math):
    assert len(MATH_CASES) >= 40
    got = [(response, answer, math(response, answer)) for response, answer, _ in MATH_CASES]
    assert got == MATH_CASES


@pytest.mark.parametrize("response", PATHOLOGICAL)
def test_math_times_out_as_malformed(math, response):
    start = time.monotonic()
    assert math(response, "1") == MALFORMED
    assert time.monotonic() - start < MATH_TIMEOUT_S + 2
    assert math(r"\boxed{2}", "2") == CORRECT  # a fresh worker takes over


def test_math_timeout_holds_off_the_main_thread(math):
    results = {}

    def check():
        start = time.monotonic()
        results["slow"] = verify_math(PATHOLOGICAL[0], "1", timeout=1.0)
        results["seconds"] = time.monotonic() - start
        results["fine"] = verify_math(r"\boxed{\frac12}", "0.5")

    thread = threading.Thread(target=check)
    thread.start()
    thread.join(30)
    assert results["slow"] == MALFORMED and results["seconds"] < 3
    assert results["fine"] == CORRECT


@pytest.mark.parametrize("response", [
    "\\boxed{" * 200, "}}}{{{", "$" * 501, "\x00\ud800\x7f", "(" * 3000 + "1", "\\" * 99,
    "\\frac{" * 300, "1/0", r"\boxed{\frac{1}{0}}", "\n".join(["x ="] * 50),
])
def test_math_never_raises(math, response):
    assert math(response, "1") in (CORRECT, WRONG, MALFORMED)


def test_math_survives_a_dead_worker(math):
    verifiers._WORKER._proc.kill()
    assert math(r"\boxed{3}", "3") == CORRECT


@pytest.mark.parametrize("response, answer, expected", [
    ("Paris", "paris", CORRECT),
    ("  The   Eiffel\ttower. ", "the eiffel tower", CORRECT),
    ("Paris.", "Paris", CORRECT),
    ("paris", "Paris.", CORRECT),
    (r"It is \boxed{ Paris } I think", "paris", CORRECT),  # the last box, when there is one
    (r"\boxed{Rome} no, \boxed{Paris}", "Paris", CORRECT),
    ("Paris, France", "Paris", WRONG),
    ("1/2", "0.5", WRONG),  # no maths: strings only
    (r"\boxed{Paris", "Paris", MALFORMED),  # never closed
    (r"\boxed{ }", "Paris", MALFORMED),
    ("   ", "Paris", MALFORMED),
])
def test_exact(response, answer, expected):
    assert get_verifier("exact")(response, answer) == expected


@pytest.mark.parametrize("response, expected", [
    ("2+3+0=05;1+1+0=02;A:25", CORRECT), ("A:26", WRONG), ("A:", MALFORMED)])
def test_addition(response, expected):
    assert get_verifier("addition")(response, "25") == expected


def test_built_in_names():
    assert VERIFIER_NAMES == ("addition", "exact", "math")
    assert all(callable(get_verifier(name)) for name in VERIFIER_NAMES)


def _write_module(tmp_path, monkeypatch, name, text):
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_import_path(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_verifiers",
                  "def yes_no(response_text, answer):\n"
                  "    return 'correct' if response_text.strip() == answer else 'wrong'\n")
    verify = get_verifier("my_verifiers:yes_no")
    assert verify(" yes ", "yes") == CORRECT and verify("no", "yes") == WRONG


@pytest.mark.parametrize("name, message", [
    ("x", "unknown verifier 'x': built-in ones are addition, exact, math, or give module:function"),
    ("Math", "unknown verifier 'Math': built-in ones are addition, exact, math, "
             "or give module:function"),
    (":fn", "unknown verifier ':fn': built-in ones are addition, exact, math, "
            "or give module:function"),
    ("other_verifiers:", "unknown verifier 'other_verifiers:': built-in ones are addition, "
                         "exact, math, or give module:function"),
    ("no_such_module_xyz:fn", "verifier 'no_such_module_xyz:fn': cannot import "
                              "'no_such_module_xyz' (ModuleNotFoundError: No module named "
                              "'no_such_module_xyz')"),
    ("broken_verifiers:fn", "verifier 'broken_verifiers:fn': cannot import 'broken_verifiers' "
                            "(ZeroDivisionError: division by zero)"),
    ("other_verifiers:missing", "verifier 'other_verifiers:missing': module 'other_verifiers' "
                                "has no 'missing'"),
    ("other_verifiers:THRESHOLD", "verifier 'other_verifiers:THRESHOLD': "
                                  "other_verifiers.THRESHOLD is not callable (it is a float)"),
])
def test_verifier_errors(tmp_path, monkeypatch, name, message):
    _write_module(tmp_path, monkeypatch, "other_verifiers", "THRESHOLD = 0.5\n")
    _write_module(tmp_path, monkeypatch, "broken_verifiers", "1 / 0\n")
    with pytest.raises(VerifierError) as error:
        get_verifier(name)
    assert str(error.value) == message
    assert isinstance(error.value, UserError)  # reported as one line by every command


def test_math_without_math_verify(monkeypatch):
    find_spec = importlib.util.find_spec

    def without_math_verify(name, *rest):
        return None if name == "math_verify" else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", without_math_verify)
    with pytest.raises(VerifierError) as error:
        get_verifier("math")
    assert str(error.value) == ("verifier 'math' needs the math-verify package "
                                "(pip install math-verify)")
