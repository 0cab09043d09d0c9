"""Train the SentencePiece tokenizer of a built-in task.

addition: character level, one piece per symbol of the task's alphabet. formats (the several-formats
variant, tasks/formats.py): BPE of --vocab-size pieces over every problem in every format, so that a
top-k of 8 to 16 ids truncates the teacher's distribution. Both add <unk>, <s>, </s> (the end of
every response) and <pad>, and no dummy-prefix space, so a prompt and its response encode to
exactly their characters.

    python tools/train_tokenizer.py --output examples/toy/tokenizer.model
    python tools/train_tokenizer.py --task formats --vocab-size 384 --output formats.model
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.errors import UserError  # noqa: E402
from megatron_tropd.runtime import cli
from megatron_tropd.tasks import formats  # noqa: E402
from megatron_tropd.tasks.addition import ALPHABET  # noqa: E402
from megatron_tropd.tasks.splits import heldout_problems, train_problems  # noqa: E402

SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


def train_tokenizer(output: str, corpus_problems: int = 2000, task: str = "addition",
                    vocab_size: int = 384):
    """Write the SentencePiece model file `output` (a `.model` path)."""
    import sentencepiece as spm

    if not output.endswith(".model"):
        raise UserError(f"--output must name a .model file, got {output}")
    problems = train_problems(corpus_problems, heldout_problems(0))
    if task == "addition":
        lines = [p.prompt + p.solution() for p in problems]
        model = dict(model_type="char", vocab_size=len(ALPHABET) + len(SPECIAL))
    else:
        lines = formats.tokenizer_corpus(problems)
        model = dict(model_type="bpe", vocab_size=vocab_size, split_digits=False,
                     max_sentencepiece_length=8)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.writelines(line + "\n" for line in lines)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=output.removesuffix(".model"), character_coverage=1.0,
            add_dummy_prefix=False, normalization_rule_name="identity", minloglevel=2,
            **model, **SPECIAL)
    os.remove(output.removesuffix(".model") + ".vocab")  # the .model file holds everything


def main():
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--output", required=True, help="SentencePiece .model file to write")
    parser.add_argument("--task", choices=("addition", "formats"), default="addition")
    parser.add_argument("--vocab-size", type=int, default=384, help="BPE pieces (formats)")
    args = parser.parse_args()
    errors.run_main(train_tokenizer, args.output, task=args.task, vocab_size=args.vocab_size)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
