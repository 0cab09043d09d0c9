"""Write the teacher responses of off-policy guidance: one JSONL record per prompt, in the format
`megatron_tropd/rollout/teacher_responses.py` reads.

    torchrun --nproc-per-node 8 tools/generate_teacher_responses.py --load ckpt/teacher --tp 2 \\
        --prompts prompts.jsonl --prompt-template plain --output teacher_responses.jsonl \\
        --temperature 1.0 --max-new-tokens 8192

    python tools/generate_teacher_responses.py ...        # one process, TP=1 PP=1

The teacher: `--load`, a Megatron checkpoint or an HF model directory, loaded as
`python -m megatron_tropd.evaluate` loads one. The prompts: rows with `prompt_ids` (token ids, used
as given), or text / messages tokenized exactly as the trainer tokenizes its `--prompts` (the same
`--tokenizer`, `--prompt-template` and column flags), so that the trainer finds each response by
its prompt's ids. The tokenizer (the checkpoint's unless `--tokenizer`) also gives the default stop
id, its EOS, and the `prompt` / `response` texts written next to the ids.

Generation is the rollout code itself (`rollout.generate`) at any TP/PP; the world is split into
`world / (tp * pp)` data-parallel replicas that take contiguous shares of the prompts, and rank 0
writes the file in prompt order. Samples are keyed by prompt index, so the file does not depend on
the parallel layout or the batch size.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_tropd import errors  # noqa: E402
from megatron_tropd.records import DataError, read_rows  # noqa: E402
from megatron_tropd.runtime import cli


def parse_args(argv=None):
    from megatron_tropd.arguments import add_data_args

    parser = cli.argument_parser(__doc__)
    parser.add_argument("--load", required=True, help="the teacher: a Megatron checkpoint or HF "
                        "model directory")
    parser.add_argument("--prompts", required=True, help="rows with prompt_ids, or prompts as "
                        "the trainer's --prompts (.jsonl, .json, .parquet, a saved dataset)")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    add_data_args(parser)
    cli.add_parallel_args(parser)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--stop-ids", type=int, nargs="*", default=None,
                        help="ids that end a response (default: the tokenizer's EOS)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences decoded at once (continuous batching)")
    return parser.parse_args(argv)


def read_prompts(args, tokenizer):
    """The token ids of every prompt: a file of `prompt_ids` rows as given, any other file as the
    trainer reads its --prompts."""
    from megatron_tropd.data import columns_from_args, load_prompts, token_ids
    from megatron_tropd.tokenizer import load_chat_template

    rows = list(read_rows(args.prompts))
    with_ids = ["prompt_ids" in row for _, row in rows]
    if all(with_ids):
        return [token_ids(where, row, "prompt_ids", None) for where, row in rows]
    if any(with_ids):
        where = rows[with_ids.index(False)][0]
        raise DataError(f"{where}: no prompt_ids, which other rows of the file have (give ids on "
                        f"every row, or text on every row)")
    if args.chat_template_file:
        load_chat_template(tokenizer, args.chat_template_file)
    examples = load_prompts(args.prompts, tokenizer, args.prompt_template,
                            columns=columns_from_args(args))
    return [example.prompt_ids for example in examples]


def main(argv=None):
    args = parse_args(argv)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.evaluate import load_inference_model
    from megatron_tropd.rollout.generate import SamplingParams, generate
    from megatron_tropd.rollout.teacher_responses import write_teacher_responses
    from megatron_tropd.runtime.initialize import initialize_distributed, print_rank_0
    from megatron_tropd.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.load)
    prompts = read_prompts(args, tokenizer)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           seed=args.seed)
    arch, teacher = load_inference_model(args.load)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            stop_ids=tuple(args.stop_ids if args.stop_ids is not None
                                           else [tokenizer.eos_id]))
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = -(-len(prompts) // dp_size)
    first, last = dp_rank * share, min(len(prompts), (dp_rank + 1) * share)
    mine = prompts[first:last]
    responses = generate(teacher, mine, params, arch.vocab_size, sample_offset=first,
                         rollout_batch_size=args.batch_size).responses() if mine else []
    records = [{"prompt_ids": ids, "response_ids": response, "prompt": tokenizer.decode(ids),
                "response": tokenizer.decode(response)} for ids, response in zip(mine, responses)]
    shares = [None] * dp_size
    dist.all_gather_object(shares, records, group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        write_teacher_responses(args.output, [r for part in shares for r in part])
    print_rank_0(f"wrote {sum(len(p) for p in shares)} teacher responses to {args.output}")
    dist.barrier()  # the file is complete when main returns, on every rank


if __name__ == "__main__":
    errors.run_main(main)
