"""Train the character-level SentencePiece tokenizer of the built-in addition task.

One piece per symbol of the task's alphabet plus <unk>, <s>, </s> (the end of every response) and
<pad>; no dummy-prefix space, so a prompt and its response encode to exactly their characters.

    python tools/train_tokenizer.py --output examples/toy/tokenizer.model
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import cli  # noqa: E402
from megatron_tropd.tasks.addition import ALPHABET  # noqa: E402
from megatron_tropd.tasks.splits import heldout_problems, train_problems  # noqa: E402

SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


def train_tokenizer(output: str, corpus_problems: int = 2000):
    """Write the SentencePiece model file `output` (a `.model` path)."""
    import sentencepiece as spm

    if not output.endswith(".model"):
        raise ValueError(f"--output must name a .model file, got {output}")
    problems = train_problems(corpus_problems, heldout_problems(0))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.writelines(p.prompt + p.solution() + "\n" for p in problems)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=output.removesuffix(".model"), model_type="char",
            vocab_size=len(ALPHABET) + len(SPECIAL), character_coverage=1.0,
            add_dummy_prefix=False, normalization_rule_name="identity", minloglevel=2, **SPECIAL)
    os.remove(output.removesuffix(".model") + ".vocab")  # the .model file holds everything


def main():
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--output", required=True, help="SentencePiece .model file to write")
    args = parser.parse_args()
    try:
        train_tokenizer(args.output)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
