"""Evaluate checkpoints on a benchmark file: greedy pass@1, sampled pass@k and avg@k, response
lengths; or score responses generated elsewhere.

    python -m megatron_tropd.evaluate --load examples/toy/student --data heldout.jsonl
    torchrun --nproc-per-node 2 -m megatron_tropd.evaluate --load ckpt/student \\
        --data aime24.parquet --prompt-key problem --verifier math --tensor-model-parallel-size 2 \\
        --max-new-tokens 8192 --samples 16 --pass-k 1 8 --output eval.json
    python -m megatron_tropd.evaluate --responses vllm_outputs.jsonl --verifier math

`--load` is a Megatron checkpoint directory (ours: megatron_tropd.json, saved at any TP/PP) or an
HF model directory (config.json + safetensors, loaded through the same parameter mapping as the
converter). `--data` is any prompt file the trainer reads (JSONL, JSON, Parquet, a datasets
directory; the same column flags) whose rows carry answers; each response is checked by
`--verifier` (tasks/verifiers.py: correct / wrong / malformed). pass@1 is the fraction of prompts
whose greedy response is correct. With `--samples` n: pass@k by the unbiased estimator
1 - C(n - c, k) / C(n, k) (c correct of n) and avg@n, the mean fraction of correct samples (the
AIME convention), both averaged over prompts. Mean response length (tokens, the stop id not
counted) and the fraction that hit --max-new-tokens; per source when the file has a source column
(`--source-key`). A table on stdout, everything in `--output` (JSON). Processes beyond TP x PP are
data-parallel replicas that split the prompts.
"""

import dataclasses
import json
import os
import time
from math import comb
from typing import Optional

from megatron_tropd import errors
from megatron_tropd.errors import UserError
from megatron_tropd.runtime import cli
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG, verify


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def load_inference_model(directory: str):
    """(arch, this rank's frozen model stage) of a Megatron or HF checkpoint directory, at the
    current TP/PP layout (evaluation, offline teacher responses)."""
    from megatron_tropd.checkpoint.conversion import build_from_hf
    from megatron_tropd.checkpoint.model_dir import (METADATA_FILE, load_model, params_dtype,
                                                     read_metadata)
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model

    if os.path.isfile(os.path.join(directory, METADATA_FILE)):
        arch = ModelArch.from_file(directory)
        model = build_model(arch, "teacher", params_dtype=params_dtype(read_metadata(directory)),
                            perform_initialization=False)
        load_model(directory, model)
        return arch, model
    return build_from_hf(directory, role="teacher")


def load_for_eval(directory: str, tokenizer_path: str = None):
    """(arch, this rank's model stage, tokenizer) of a Megatron or HF checkpoint directory; the
    tokenizer is the directory's own unless `tokenizer_path` is given."""
    from megatron_tropd.tokenizer import load_tokenizer

    return (*load_inference_model(directory), load_tokenizer(tokenizer_path or directory))


@dataclasses.dataclass
class Scored:
    """One response as evaluation counts it: the verifier's outcome, its length in tokens and
    whether it hit the length limit (None for responses scored from a file)."""

    outcome: str
    length: Optional[int] = None
    truncated: Optional[bool] = None


def _responses(model, examples, vocab_size: int, params, batch_size: int) -> list[list]:
    """Every example's `params.n_samples` response ids."""
    from megatron_tropd.rollout.generate import generate

    responses = generate(model, [e.prompt_ids for e in examples], params, vocab_size,
                         rollout_batch_size=batch_size).responses()
    n = params.n_samples
    return [responses[i * n:(i + 1) * n] for i in range(len(examples))]


def _score(verifier, tokenizer, ids, answer, params) -> Scored:
    stopped = bool(ids) and ids[-1] in params.stop_ids
    return Scored(verifier(tokenizer.decode(ids), answer), len(ids) - stopped,
                  not stopped and len(ids) >= params.max_new_tokens)


def evaluate(model, tokenizer, examples, vocab_size: int, max_new_tokens: int,
             pass_k=(1,), samples: int = 0, temperature: float = 1.0, batch_size: int = 64,
             seed: int = 0, verifier=verify, responses_out: list = None) -> dict:
    """The figures of `summarize` for greedy responses and, when `samples` > 0, `samples`
    sampled ones per example, over every data-parallel replica's examples. Collective: the ranks
    of a model-parallel group pass the same examples, data-parallel replicas their own slices
    (the figures are of all of them). `responses_out` collects this rank's greedy responses as
    `--responses` reads them."""
    from megatron_tropd.rollout.generate import SamplingParams

    stop = (tokenizer.eos_id,)
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                   stop_ids=stop, seed=seed)
    greedy = _responses(model, examples, vocab_size, greedy_params, batch_size)
    scored = [{"source": e.source,
               "greedy": _score(verifier, tokenizer, g[0], e.answer, greedy_params),
               "samples": []} for e, g in zip(examples, greedy)]
    if responses_out is not None:
        responses_out += [{"index": e.index, "response": tokenizer.decode(g[0]),
                           "answer": e.answer, "source": e.source}
                          for e, g in zip(examples, greedy)]
    if samples:
        sample_params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                       stop_ids=stop, n_samples=samples, seed=seed)
        sampled = _responses(model, examples, vocab_size, sample_params, batch_size)
        for item, example, responses in zip(scored, examples, sampled):
            item["samples"] = [_score(verifier, tokenizer, r, example.answer, sample_params)
                               for r in responses]
    return summarize(_gather_over_data_parallel(scored), pass_k,
                     {"temperature": temperature} if samples else None)


def summarize(scored: list, pass_k=(1,), sampling: dict = None) -> dict:
    """pass@1 of the greedy responses with their outcome counts, mean length and the fraction
    that hit the length limit; with samples, unbiased pass@k for each k, avg@n (the mean
    fraction correct over the n samples, the AIME convention) and their lengths; and the same
    per source when the examples name one."""
    result = _figures(scored, pass_k, sampling)
    sources = sorted({item["source"] for item in scored if item["source"] is not None})
    if sources:
        result["by_source"] = {source: _figures([i for i in scored if i["source"] == source],
                                                pass_k, sampling) for source in sources}
    return result


def _figures(scored, pass_k, sampling) -> dict:
    greedy = [item["greedy"] for item in scored]
    counts = {o: sum(g.outcome == o for g in greedy) for o in (CORRECT, WRONG, MALFORMED)}
    result = {"problems": len(scored), "pass@1": counts[CORRECT] / len(scored),
              "greedy": counts, **_lengths(greedy, "")}
    n = len(scored[0]["samples"])
    if n:
        correct = [sum(s.outcome == CORRECT for s in item["samples"]) for item in scored]
        for k in pass_k:
            result[f"sampled_pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
        result[f"avg@{n}"] = sum(correct) / (n * len(correct))
        result.update(_lengths([s for item in scored for s in item["samples"]], "sampled_"))
        result["sampling"] = {"samples": n, **(sampling or {})}
    return result


def _lengths(responses, prefix) -> dict:
    if responses[0].length is None:
        return {}
    return {f"{prefix}mean_length": sum(r.length for r in responses) / len(responses),
            f"{prefix}truncated": sum(r.truncated for r in responses) / len(responses)}


def _gather_over_data_parallel(scored: list) -> list:
    """Every data-parallel replica's examples, in replica order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_data_parallel_world_size() == 1:
        return scored
    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, scored, group=ps.get_data_parallel_group())
    return [item for part in parts for item in part]


def score_responses(path, verifier, prompts: list = None) -> dict:
    """`summarize` of responses generated elsewhere, no model: rows of a data file (any format
    `records` reads) holding a `response` and its `answer`, or the `index` of its prompt in
    `prompts` (whose answer counts), and optionally a `source`; rows sharing an index are samples
    of one problem (the first one counts for pass@1). `--save-responses` writes this format."""
    from megatron_tropd.records import DataError, column, read_rows

    problems = {}
    for row_number, (where, row) in enumerate(read_rows(path)):
        response = column(row, "response", None)
        if not isinstance(response, str):
            raise DataError(f"{where}: needs a 'response' string")
        index = column(row, "index", None)
        answer, source = column(row, "answer", None), column(row, "source", None)
        if index is not None and prompts is not None:
            if not isinstance(index, int) or not 0 <= index < len(prompts):
                raise DataError(f"{where}: 'index' {index!r} is not a prompt of --data "
                                f"({len(prompts)} prompts)")
            answer = prompts[index].answer if answer is None else answer
            source = prompts[index].source if source is None else source
        if answer is None:
            raise DataError(f"{where}: no 'answer' (and no 'index' into --data)")
        key = ("index", index) if index is not None else ("row", row_number)
        problems.setdefault(key, []).append((Scored(verifier(response, str(answer))), source))
    scored = []
    for responses in problems.values():
        samples = [r for r, _ in responses] if len(responses) > 1 else []
        scored.append({"source": None if responses[0][1] is None else str(responses[0][1]),
                       "greedy": responses[0][0], "samples": samples})
    if len({len(item["samples"]) for item in scored}) > 1:
        raise DataError(f"{path}: problems have different numbers of responses")
    return summarize(scored, pass_k=(1,))


def _parse_args(argv=None):
    from megatron_tropd.arguments import add_data_args

    parser = cli.argument_parser(__doc__)
    parser.add_argument("--load", nargs="+",
                        help="Megatron checkpoint or HF model directories, evaluated in turn")
    parser.add_argument("--label", nargs="+", help="row names of the table (default: --load)")
    parser.add_argument("--data", help="prompts with answers: .jsonl, .json, .parquet or a "
                        "datasets save_to_disk directory")
    parser.add_argument("--responses", help="score the responses in this file (rows with a "
                        "'response' and an 'answer' or an 'index' into --data) instead of "
                        "generating: no model is loaded")
    parser.add_argument("--save-responses", help="write the greedy responses here (JSONL, what "
                        "--responses reads; with several --load, one file each: .<label>)")
    parser.add_argument("--verifier", default="addition",
                        help="addition, math (math-verify), exact, or module:function")
    parser.add_argument("--limit", type=int, default=0, help="first N problems only (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--pass-k", type=int, nargs="+", default=[1],
                        help="k values of sampled pass@k (needs --samples >= max k)")
    parser.add_argument("--samples", type=int, default=0,
                        help="samples per problem for pass@k and avg@n (0: greedy pass@1 only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the pass@k samples")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="sequences decoded at once (continuous batching)")
    add_data_args(parser)
    cli.add_parallel_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--output", help="JSON file to write the results to ({label: result})")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library warning; by default the known-harmless ones are "
                             "filtered (megatron_tropd/runtime/console.py; also TROPD_VERBOSE=1)")
    return parser.parse_args(argv)


def main(argv=None):
    """Console entry point: exit status 2 with a one-line `error: ...` for bad input
    (`errors.run_main`)."""
    from megatron_tropd.runtime import console

    args = _parse_args(argv)
    console.configure(args.verbose)
    errors.run_main(_evaluate, args)


def _evaluate(args):
    if bool(args.load) == bool(args.responses):
        raise UserError("give --load (generate and score) or --responses (score a file)")
    if args.load and not args.data:
        raise UserError("--load needs --data, the prompts to answer")
    if args.samples and max(args.pass_k) > args.samples:
        raise UserError(f"--pass-k {max(args.pass_k)} needs --samples >= {max(args.pass_k)}")
    rows = len(args.load) if args.load else 1  # --responses: one row
    if args.label and len(args.label) != rows:
        raise UserError(f"{len(args.label)} labels for {rows} table rows")
    rows = score_file(args) if args.responses else run(args)
    _report(args, rows)


def score_file(args) -> list:
    """--responses: one table row, scored by the verifier alone."""
    from megatron_tropd.data import columns_from_args, load_prompts
    from megatron_tropd.tasks.verifiers import get_verifier
    from megatron_tropd.tokenizer import load_tokenizer

    prompts = None
    if args.data:
        if not args.tokenizer:
            raise UserError("--responses with --data needs --tokenizer (to read the prompts)")
        prompts = load_prompts(args.data, load_tokenizer(args.tokenizer), args.prompt_template,
                               columns=columns_from_args(args))
    result = score_responses(args.responses, get_verifier(args.verifier), prompts)
    result.update(responses=args.responses, verifier=args.verifier)
    return [(args.label[0] if args.label else args.responses, result)]


def run(args) -> list:
    """Generate with each --load in turn and score; (label, result) rows."""
    from megatron.core import parallel_state as ps

    from megatron_tropd.data import DataError, columns_from_args, load_prompts
    from megatron_tropd.runtime.initialize import initialize_distributed, print_rank_0, rank
    from megatron_tropd.tasks.splits import write_jsonl
    from megatron_tropd.tasks.verifiers import get_verifier
    from megatron_tropd.tokenizer import load_chat_template

    verifier = get_verifier(args.verifier)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    rows = []
    for load, label in zip(args.load, args.label or args.load):
        start = time.perf_counter()
        arch, model, tokenizer = load_for_eval(load, args.tokenizer)
        if args.chat_template_file:
            load_chat_template(tokenizer, args.chat_template_file)
        examples = load_prompts(args.data, tokenizer, args.prompt_template,
                                columns=columns_from_args(args))
        if args.limit:
            examples = examples[:args.limit]
        missing = [e.index for e in examples if e.answer is None]
        if missing:
            raise DataError(f"{args.data}: problem {missing[0]} has no '{args.answer_key}' to "
                            f"verify against")
        # Data-parallel replicas take interleaved slices; the results are gathered over them.
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        responses = [] if args.save_responses else None
        result = evaluate(model, tokenizer, examples[dp_rank::dp], arch.vocab_size,
                          args.max_new_tokens, args.pass_k, args.samples, args.temperature,
                          args.batch_size, args.seed, verifier, responses)
        if responses is not None:
            path = args.save_responses + (f".{label}" if len(args.load) > 1 else "")
            responses = _gather_over_data_parallel(responses)
            if rank() == 0:
                write_jsonl(path, responses)
        result.update(load=load, data=args.data, verifier=args.verifier,
                      seconds=round(time.perf_counter() - start, 1))
        print_rank_0(f"[eval] {label}: pass@1 {result['pass@1']:.3f} ({result['seconds']} s)")
        rows.append((label, result))
    return rows



def _report(args, rows):
    """The table on stdout and the JSON file (rank 0)."""
    from megatron_tropd.runtime.initialize import rank

    if rank() != 0:
        return
    print(format_table(rows), flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(dict(rows), f, indent=2)
            f.write("\n")


def format_table(rows) -> str:
    """Markdown-style table of (label, result) rows, a row per source after each model's."""
    extra = sorted({k for _, r in rows for k in r
                    if k.startswith(("sampled_pass@", "avg@"))})
    lengths = any("mean_length" in r for _, r in rows)
    header = (["model", "problems", "pass@1", "correct", "wrong", "malformed"] + extra
              + (["mean len", "truncated"] if lengths else []))
    lines = [" | ".join(header)]
    for label, result in rows:
        for name, r in [(label, result)] + [(f"  {label} [{source}]", figures) for source, figures
                                            in result.get("by_source", {}).items()]:
            g = r["greedy"]
            cells = [name, str(r["problems"]), f"{r['pass@1']:.3f}", str(g[CORRECT]),
                     str(g[WRONG]), str(g[MALFORMED])]
            cells += [f"{r[k]:.3f}" if k in r else "-" for k in extra]
            if lengths:
                cells += ([f"{r['mean_length']:.1f}", f"{r['truncated']:.3f}"]
                          if "mean_length" in r else ["-", "-"])
            lines.append(" | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
