"""Seeded train and held-out problem sets that never overlap, and the JSONL files made from them.

The held-out split is drawn first, stratified (the same number of problems per digit count, no
duplicates); the train split is drawn from another seed and rejects every held-out problem, so no
held-out problem is ever trained on, whatever the sizes.

    python -m megatron_tropd.tasks.splits --output-dir data/addition --train 20000 --heldout 500
"""

import json
import os
import random

from megatron_tropd import errors
from megatron_tropd.errors import UserError
from megatron_tropd.runtime import cli
from megatron_tropd.tasks.addition import Problem, check_digit_range, random_problem

# Offsets that keep the two splits' random streams apart for any one seed.
_HELDOUT_STREAM, _TRAIN_STREAM = 0x48454C44, 0x54524149


def heldout_problems(count: int, seed: int = 0, min_digits: int = 2,
                     max_digits: int = 5) -> list[Problem]:
    """`count` distinct problems, as evenly spread over the digit counts as `count` allows."""
    check_digit_range(min_digits, max_digits)
    rng = random.Random(seed + _HELDOUT_STREAM)
    digit_counts = range(min_digits, max_digits + 1)
    for d in digit_counts:
        capacity = (9 * 10 ** (d - 1)) ** 2
        if capacity < count // len(digit_counts) + 1:
            raise UserError(f"only {capacity} problems with {d} digits: cannot draw {count} "
                            f"held-out problems over {min_digits}..{max_digits} digits")
    problems, seen = [], set()
    for i in range(count):
        digits = digit_counts[i % len(digit_counts)]
        problem = random_problem(rng, digits)
        while problem in seen:
            problem = random_problem(rng, digits)
        seen.add(problem)
        problems.append(problem)
    return problems


def train_problems(count: int, heldout: list[Problem], seed: int = 0, min_digits: int = 2,
                   max_digits: int = 5) -> list[Problem]:
    """`count` problems (repeats allowed), digit count uniform, none of them in `heldout`."""
    check_digit_range(min_digits, max_digits)
    rng = random.Random(seed + _TRAIN_STREAM)
    excluded = set(heldout)
    problems = []
    while len(problems) < count:
        problem = random_problem(rng, rng.randint(min_digits, max_digits))
        if problem not in excluded:
            problems.append(problem)
    return problems


def write_prompts(path: str, problems: list[Problem]):
    """Prompt JSONL (`{prompt, answer}`) for distillation and evaluation."""
    write_jsonl(path, ({"prompt": p.prompt, "answer": p.answer} for p in problems))


def write_sft(path: str, problems: list[Problem]):
    """SFT JSONL (`{prompt, response, answer}`): the worked solutions."""
    write_jsonl(path, ({"prompt": p.prompt, "response": p.solution(), "answer": p.answer}
                       for p in problems))


def write_jsonl(path, records):
    """One JSON object a line (the directory made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_task_files(output_dir: str, train: int, heldout: int, seed: int = 0,
                     min_digits: int = 2, max_digits: int = 5) -> dict:
    """train_prompts.jsonl, train_sft.jsonl and heldout.jsonl in `output_dir`; returns the paths."""
    held = heldout_problems(heldout, seed, min_digits, max_digits)
    trained = train_problems(train, held, seed, min_digits, max_digits)
    paths = {name: os.path.join(output_dir, f"{name}.jsonl")
             for name in ("train_prompts", "train_sft", "heldout")}
    write_prompts(paths["train_prompts"], trained)
    write_sft(paths["train_sft"], trained)
    write_prompts(paths["heldout"], held)
    return paths


def main(argv=None):
    p = cli.argument_parser(__doc__)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--train", type=int, default=20000, help="train problems")
    p.add_argument("--heldout", type=int, default=500, help="held-out problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-digits", type=int, default=2)
    p.add_argument("--max-digits", type=int, default=5)
    args = p.parse_args(argv)
    paths = errors.run_main(write_task_files, args.output_dir, args.train, args.heldout,
                            args.seed, args.min_digits, args.max_digits)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


if __name__ == "__main__":
    main()
