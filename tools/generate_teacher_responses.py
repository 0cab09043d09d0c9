"""Write the teacher responses of off-policy guidance: one JSONL record per prompt, in the format
`megatron_tropd/rollout/teacher_responses.py` reads.

    torchrun --nproc-per-node 2 tools/generate_teacher_responses.py --tp 2 \\
        --model-config teacher/config.json --weights teacher/global_state_dict.pt \\
        --prompts prompts.jsonl --output teacher_responses.jsonl \\
        --temperature 1.0 --max-new-tokens 1024 --stop-ids 2

    python tools/generate_teacher_responses.py ...        # one process, TP=1 PP=1

Prompts: JSONL with `prompt_ids` (token ids) per line, or `prompt` (text) with `--tokenizer`, an HF
tokenizer directory (plain `tokenizer(text)`, no chat template; its EOS id is the default stop id).
Generation is the rollout code itself (`rollout.generate`) at any TP/PP; the world is split into
`world / (tp * pp)` data-parallel replicas that take contiguous shares of the prompts, and rank 0
writes the file in prompt order. Samples are keyed by prompt index, so the file does not depend on
the parallel layout or the batch size.

The teacher is built by `load_teacher` from a model config (our ModelArch JSON or an HF
`config.json`/directory) and a global megatron state dict saved with `torch.save`; that function is
the one place to replace when the checkpoint loader exists.
"""

import torch

from megatron_tropd import cli, errors
from megatron_tropd.records import DataError, read_rows


def parse_args(argv):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--model-config", required=True,
                        help="ModelArch JSON, or an HF config.json or its directory")
    parser.add_argument("--weights", required=True,
                        help="global megatron state dict (torch.save) of the teacher")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt_ids or prompt per line")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory (text prompts)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--stop-ids", type=int, nargs="*", default=None,
                        help="ids that end a response (default: the tokenizer's EOS, if any)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences decoded at once (continuous batching)")
    return parser.parse_args(argv)


def read_prompts(path, tokenizer):
    """Token ids and text (None when given as ids) of every prompt in the file (any format
    `records.read_rows` reads)."""
    prompts = []
    for where, record in read_rows(path):
        if "prompt_ids" in record:
            prompts.append((list(record["prompt_ids"]), record.get("prompt")))
        elif "prompt" in record and tokenizer is not None:
            prompts.append((tokenizer(record["prompt"])["input_ids"], record["prompt"]))
        else:
            raise DataError(f"{where}: needs prompt_ids, or prompt with --tokenizer")
    return prompts


def load_teacher(model_config: str, weights: str):
    """(teacher model stage, ModelArch) at the current TP/PP layout."""
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.models.sharding import load_global_state_dict

    arch = ModelArch.from_file(model_config)
    model = build_model(arch, "teacher")
    load_global_state_dict(model, torch.load(weights, map_location="cpu", weights_only=True))
    return model, arch


def main(argv=None):
    args = parse_args(argv)
    tokenizer = None
    if args.tokenizer:  # before initialisation: see benchmarks/rollout.py on transformers imports
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = read_prompts(args.prompts, tokenizer)
    stop_ids = args.stop_ids
    if stop_ids is None:
        stop_ids = [tokenizer.eos_token_id] if tokenizer and tokenizer.eos_token_id is not None else []

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd import initialize
    from megatron_tropd.rollout.generate import SamplingParams, generate

    initialize.initialize_distributed(args.tp, args.pp, seed=args.seed)
    teacher, arch = load_teacher(args.model_config, args.weights)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_ids=tuple(stop_ids),
                            seed=args.seed)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = -(-len(prompts) // dp_size)
    first, last = dp_rank * share, min(len(prompts), (dp_rank + 1) * share)
    records = []
    mine = [ids for ids, _ in prompts[first:last]]
    responses = generate(teacher, mine, params, arch.vocab_size, sample_offset=first,
                         rollout_batch_size=args.batch_size).responses() if mine else []
    for i, response in enumerate(responses):
        record = {"prompt_ids": mine[i], "response_ids": response}
        if tokenizer is not None:
            record.update(prompt=prompts[first + i][1] or tokenizer.decode(mine[i]),
                          response=tokenizer.decode(response))
        records.append(record)
    shares = [None] * dp_size
    dist.all_gather_object(shares, records, group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        from megatron_tropd.rollout.teacher_responses import write_teacher_responses

        write_teacher_responses(args.output, [r for part in shares for r in part])
        print(f"wrote {sum(len(p) for p in shares)} teacher responses to {args.output}", flush=True)
    dist.barrier()  # the file is complete when main returns, on every rank


if __name__ == "__main__":
    errors.run_main(main)
