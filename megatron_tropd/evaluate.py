"""Evaluate a checkpoint on a verifiable task split: pass@1 (greedy) and pass@k (sampled).

    python -m megatron_tropd.evaluate --load examples/toy/student --data heldout.jsonl
    torchrun --nproc-per-node 2 -m megatron_tropd.evaluate --load ckpt/student \\
        --data heldout.jsonl --tensor-model-parallel-size 2 --pass-k 1 4 --samples 8 \\
        --output eval.json

`--load` is a Megatron checkpoint directory (ours: megatron_tropd.json, saved at any TP/PP) or an
HF model directory (config.json + safetensors, loaded through the same parameter mapping as the
converter). The data is a prompt JSONL with `answer`s; each response is checked by the task's
verifier (`tasks.verifier`: correct / wrong / malformed). pass@1 is the fraction of prompts whose
greedy response is correct. pass@k uses `--samples` n >= k samples per prompt at `--temperature`
and the unbiased estimator 1 - C(n - c, k) / C(n, k) (c correct of n), averaged over prompts.
Processes beyond TP x PP are data-parallel replicas that split the prompts.
"""

import json
import os
import sys
import time
from math import comb

import torch

from megatron_tropd import cli
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG, verify


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def load_for_eval(directory: str, tokenizer_path: str = None):
    """(arch, this rank's model stage, tokenizer) of a Megatron or HF checkpoint directory; the
    tokenizer is the directory's own unless `tokenizer_path` is given."""
    from megatron_tropd.conversion import build_from_hf
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.models.checkpoint import (METADATA_FILE, load_model, params_dtype,
                                                  read_metadata)
    from megatron_tropd.tokenizer import load_tokenizer

    if os.path.isfile(os.path.join(directory, METADATA_FILE)):
        arch = ModelArch.from_file(directory)
        model = build_model(arch, "teacher", params_dtype=params_dtype(read_metadata(directory)),
                            perform_initialization=False)
        load_model(directory, model)
    else:
        arch, model = build_from_hf(directory, role="teacher")
    return arch, model, load_tokenizer(tokenizer_path or directory)


def outcomes(model, tokenizer, examples, vocab_size: int, params,
             batch_size: int) -> list[list[str]]:
    """Verifier outcome of every sample, per example (`params.n_samples` each)."""
    from megatron_tropd.rollout.generate import generate

    responses = generate(model, [e.prompt_ids for e in examples], params, vocab_size,
                         rollout_batch_size=batch_size).responses()
    n = params.n_samples
    return [[verify(tokenizer.decode(r), example.answer) for r in responses[i * n:(i + 1) * n]]
            for i, example in enumerate(examples)]


def evaluate(model, tokenizer, examples, vocab_size: int, max_new_tokens: int,
             pass_k=(1,), samples: int = 0, temperature: float = 1.0, batch_size: int = 64,
             seed: int = 0) -> dict:
    """pass@1 (greedy) with its outcome counts and, when `samples` > 0, sampled pass@k for every k
    in `pass_k`. Collective over the model-parallel group (every rank passes the same examples)."""
    from megatron_tropd.rollout.generate import SamplingParams

    stop = (tokenizer.eos_id,)
    greedy = outcomes(model, tokenizer, examples, vocab_size,
                      SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                     stop_ids=stop, seed=seed), batch_size)
    counts = {o: sum(g[0] == o for g in greedy) for o in (CORRECT, WRONG, MALFORMED)}
    result = {"problems": len(examples), "pass@1": counts[CORRECT] / len(examples),
              "greedy": counts}
    if samples:
        sampled = outcomes(model, tokenizer, examples, vocab_size,
                           SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                          stop_ids=stop, n_samples=samples, seed=seed),
                           batch_size)
        correct = [s.count(CORRECT) for s in sampled]
        for k in pass_k:
            rates = [pass_at_k(samples, c, k) for c in correct]
            result[f"sampled_pass@{k}"] = sum(rates) / len(rates)
        result["sampling"] = {"samples": samples, "temperature": temperature}
    return result


def _parse_args(argv=None):
    parser = cli.argument_parser(__doc__)
    parser.add_argument("--load", required=True, nargs="+",
                        help="Megatron checkpoint or HF model directories, evaluated in turn")
    parser.add_argument("--label", nargs="+", help="row names of the table (default: --load)")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: --load's)")
    parser.add_argument("--data", required=True, help="prompt JSONL with 'answer's")
    parser.add_argument("--limit", type=int, default=0, help="first N problems only (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--pass-k", type=int, nargs="+", default=[1],
                        help="k values of sampled pass@k (needs --samples >= max k)")
    parser.add_argument("--samples", type=int, default=0,
                        help="samples per problem for pass@k (0: greedy pass@1 only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the pass@k samples")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="sequences decoded at once (continuous batching)")
    parser.add_argument("--prompt-template", choices=("auto", "chat", "plain"), default="plain")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, metavar="N")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--output", help="JSON file to write the results to ({label: result})")
    return parser.parse_args(argv)


def main(argv=None):
    from megatron_tropd.data import DataError
    from megatron_tropd.rollout.generate import GenerationError
    from megatron_tropd.tokenizer import TokenizerError

    args = _parse_args(argv)
    try:
        if args.samples and max(args.pass_k) > args.samples:
            raise ValueError(f"--pass-k {max(args.pass_k)} needs --samples >= {max(args.pass_k)}")
        if args.label and len(args.label) != len(args.load):
            raise ValueError(f"{len(args.label)} labels for {len(args.load)} directories")
        run(args)
    except (*cli.USER_ERRORS, DataError, GenerationError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run(args):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.data import load_prompts
    from megatron_tropd.initialize import initialize_distributed, print_rank_0

    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    rows = []
    for load, label in zip(args.load, args.label or args.load):
        start = time.perf_counter()
        arch, model, tokenizer = load_for_eval(load, args.tokenizer)
        examples = load_prompts(args.data, tokenizer, args.prompt_template)
        if args.limit:
            examples = examples[:args.limit]
        missing = [e.index for e in examples if e.answer is None]
        if missing:
            raise ValueError(f"{args.data}: problem {missing[0]} has no 'answer' to verify against")
        # Data-parallel replicas take interleaved slices; the counts are summed over them below.
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        local = evaluate(model, tokenizer, examples[rank::dp], arch.vocab_size,
                         args.max_new_tokens, args.pass_k, args.samples, args.temperature,
                         args.batch_size, args.seed)
        result = _merge_data_parallel(local, dp)
        result.update(load=load, data=args.data, seconds=round(time.perf_counter() - start, 1))
        print_rank_0(f"[eval] {label}: pass@1 {result['pass@1']:.3f} ({result['seconds']} s)")
        rows.append((label, result))
    print_rank_0(format_table(rows))
    if args.output and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(dict(rows), f, indent=2)
            f.write("\n")


def _merge_data_parallel(local: dict, dp: int) -> dict:
    """Problem-weighted sums of every figure over the data-parallel replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tropd.initialize import comm_device

    if dp == 1:
        return local
    rates = sorted(k for k in local if k.startswith(("pass@", "sampled_pass@")))
    outcome_names = sorted(local["greedy"])
    n = local["problems"]
    flat = torch.tensor([float(n)] + [local[k] * n for k in rates]
                        + [float(local["greedy"][o]) for o in outcome_names], dtype=torch.float64,
                        device=comm_device())
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    total = int(flat[0])
    merged = dict(local, problems=total,
                  greedy={o: int(flat[1 + len(rates) + i]) for i, o in enumerate(outcome_names)})
    merged.update({k: float(flat[1 + i]) / total for i, k in enumerate(rates)})
    return merged


def format_table(rows) -> str:
    """Markdown-style table of (label, result) rows."""
    extra = sorted({k for _, r in rows for k in r if k.startswith("sampled_pass@")})
    header = ["model", "problems", "pass@1", "correct", "wrong", "malformed"] + extra
    lines = [" | ".join(header)]
    for label, r in rows:
        g = r["greedy"]
        cells = [label, str(r["problems"]), f"{r['pass@1']:.3f}", str(g[CORRECT]), str(g[WRONG]),
                 str(g[MALFORMED])] + [f"{r[k]:.3f}" if k in r else "-" for k in extra]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
