"""Paper-scale shapes on a CPU: per-rank memory of a training iteration against the batch size and
against the memory plan, and rollout throughput with continuous batching and shared prefill.

    python benchmarks/scale.py [--student-layers 2] [--teacher-layers 1] [--skip-memory]

Models: width-faithful, depth-reduced Qwen3-1.7B (student) and Qwen3-8B (teacher) from the shipped
configs (hidden sizes, heads, head_dim, FFN and the 151936-id vocabulary kept; `--*-layers`
layers), random weights, fp32, TP=2 on two processes (gloo). Prompts are runs of digits of the
toy tokenizer (examples/toy/student), so long prompts reach a large T without long decodes.

1. Memory (`train.train`, one iteration of tropd per run, each run in fresh processes): the
   per-rank peak above the resident model state (RSS high-water mark minus the RSS once weights,
   gradients and Adam states are set up; glibc's free memory returned with malloc_trim first),
   per phase (rollout, teacher scoring, update) and in all. Depth-reduced models are mostly
   embeddings, so the total alone would hide what the batch adds. The workers run with
   MALLOC_MMAP_THRESHOLD_=65536: every allocation above 64 KiB is its own mapping, returned when
   freed, so the RSS follows the live tensors; with glibc's default, whose threshold rises to 32
   MiB as large blocks are freed, tensors below that size come from a heap that fragments and
   the high-water mark also counts freed memory that was not reusable (a GPU's caching allocator
   has its own, different fragmentation).
   - batch_memory_ratio: --prompts-per-iteration 32 over 8 (rows of 256 tokens, the same
     --rollout-batch-size and --max-tokens-per-micro-batch); memory bounded by the micro-batch
     sizes gives about 1.
   - plan_error: the largest |plan - measured| / measured of the peak above the model state at
     rows of T = 1k, 2k and 4k tokens, the plan (`megatron_tropd.memory_plan`) made from the same
     flags.
2. Rollout (`rollout.generate` on the student alone):
   - continuous_vs_static: 64 rows of 64-token prompts, up to 128 new tokens, a stop set of one
     id in 32 (geometric lengths, mean about 30 = max/4, a few rows at the limit), 8 rows in
     flight: tokens/s of one call with 8 slots (a finished row's slot takes the next row) over
     8 calls of 8 rows each (a static batch decodes until its longest row ends), the better of
     2 repeats each;
   - shared_prefill_speedup: the time the engine spends admitting rows (prefill and key/value
     copies, `Engine._admit`) for 4 samples of one 1k-token prompt (one prefill, copied) over 4
     different 1k-token prompts (one prefill forward of the four: what an engine without
     sharing does), best of 3. The whole call's ratio is printed too: it also holds the setup
     both pay alike (on a CPU, packing the decode's weights, about 0.8 s here).

Last line: batch_memory_ratio=<x> plan_error=<y> continuous_vs_static=<z>
shared_prefill_speedup=<w>.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "examples", "toy", "student")
NEW_TOKENS = 16  # per row in the memory runs
SAMPLES = 2


def _status(field: str) -> int:
    """A `/proc/self/status` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _settle():
    """Freed heap memory back to the system, then the high-water mark reset to the RSS now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _archs(opt):
    from megatron_tropd.memory_plan import load_arch

    return (dataclasses.replace(load_arch("qwen3-1.7b"), num_layers=opt.student_layers),
            dataclasses.replace(load_arch("qwen3-8b"), num_layers=opt.teacher_layers))


def _memory_flags(root, prompts: int, row: int, budget: int, slots: int):
    """Trainer flags of one memory run: `prompts` prompts x 2 samples of `row` tokens."""
    prompt_length = row - NEW_TOKENS
    path = os.path.join(root, f"prompts_{prompts}_{row}.jsonl")
    with open(path, "w") as f:
        for i in range(prompts):  # the toy tokenizer: BOS + one token per digit
            digits = "".join(str((i * 7 + j) % 10) for j in range(prompt_length - 1))
            f.write(json.dumps({"prompt": digits}) + "\n")
    return ["--student-config", os.path.join(root, "student.json"),
            "--teacher-config", os.path.join(root, "teacher.json"), "--tokenizer", TOKENIZER,
            "--prompts", path, "--prompt-template", "plain", "--distill-method", "tropd",
            "--train-iters", "1", "--prompts-per-iteration", str(prompts),
            "--samples-per-prompt", str(SAMPLES), "--max-new-tokens", str(NEW_TOKENS),
            "--max-prompt-length", str(prompt_length), "--rollout-batch-size", str(slots),
            "--max-tokens-per-micro-batch", str(budget), "--tensor-model-parallel-size", "2",
            "--lr", "1e-6", "--seed", "1", "--log-interval", "1"]


def _memory_worker(argv):
    """One iteration under the probe: the resident RSS and each phase's peak above it."""
    from megatron_tropd import arguments, run_setup, train

    measured = {}
    original_setup, original_phase = run_setup.setup_run, train.PhaseTimer.__call__

    def setup_run(args):
        run = original_setup(args)
        run.student.optimizer.step()  # zero gradients: allocates Adam's states as a first step does
        run.student.optimizer.zero_grad()
        _settle()
        measured["resident"] = _status("VmRSS")
        return run

    @contextlib.contextmanager
    def phase(timer, name):
        _settle()
        with original_phase(timer, name):
            yield
        measured[name] = _status("VmHWM") - measured["resident"]

    run_setup.setup_run, train.PhaseTimer.__call__ = setup_run, phase
    train.train(arguments.parse_args(argv))
    return measured


def _plan(opt, argv):
    from megatron_tropd import arguments
    from megatron_tropd.memory_plan import PlanConfig, plan

    args = arguments.parse_args(argv)
    student, teacher = _archs(opt)
    return plan(PlanConfig(
        student=student, teacher=teacher, tensor_parallel=2, gpus=2, bf16=False, device="cpu",
        prompts_per_iteration=args.prompts_per_iteration,
        samples_per_prompt=args.samples_per_prompt, max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens, rollout_batch_size=args.rollout_batch_size,
        micro_batch_size=None, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        teacher_topk=args.teacher_topk))


def _memory_run(opt, root, prompts, row, budget, slots):
    from megatron_tropd.runtime.testing import run_distributed

    argv = _memory_flags(root, prompts, row, budget, slots)
    ranks = run_distributed(_memory_worker, world_size=2, tp=2, args=(argv,), timeout=3600)
    measured = {k: max(r[k] for r in ranks) for k in ("rollout", "teacher", "train")}
    predicted = _plan(opt, argv)
    expected = predicted.peak - predicted.model_state
    peak = max(measured.values())
    print(f"prompts {prompts:3d} x {SAMPLES}, rows of {row:5d} tokens: resident "
          f"{max(r['resident'] for r in ranks) / 2**30:.2f} GiB; above it (GiB) "
          + " ".join(f"{k} {v / 2**30:.3f}" for k, v in measured.items())
          + f" | peak {peak / 2**30:.3f}, plan {expected / 2**30:.3f} ("
          + " ".join(f"{k} {v / 2**30:.3f}" for k, v in predicted.phases.items())
          + f" + batch {predicted.parts['token ids and record of the batch'] / 2**30:.3f})", flush=True)
    return peak, expected


def _rollout_worker(opt, root):
    """continuous vs static tokens/s, and shared vs separate prefill seconds (student, TP=2)."""
    import torch.distributed as dist

    from megatron_tropd.models.builder import build_model
    from megatron_tropd.rollout import engine
    from megatron_tropd.rollout.generate import SamplingParams, generate

    student, _ = _archs(opt)
    model = build_model(student, "student")
    vocab = student.vocab_size

    def timed(fn):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        dist.barrier()
        return time.perf_counter() - start, out

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (64,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(temperature=1.0, max_new_tokens=128,
                            stop_ids=tuple(range(0, vocab, 32)), seed=5)
    generate(model, prompts[:8], dataclasses.replace(params, max_new_tokens=4), vocab)  # warm-up
    rates = {"continuous": [], "static": []}
    for _ in range(2):
        seconds, batch = timed(lambda: generate(model, prompts, params, vocab,
                                                rollout_batch_size=8))
        tokens = sum(batch.student_lengths)
        rates["continuous"].append(tokens / seconds)
        seconds, parts = timed(lambda: [generate(model, prompts[i:i + 8], params, vocab,
                                                 sample_offset=i, rollout_batch_size=8)
                                        for i in range(0, len(prompts), 8)])
        assert sum(sum(p.student_lengths) for p in parts) == tokens  # the same samples
        rates["static"].append(tokens / seconds)
    lengths = batch.student_lengths

    admitting = []
    original_admit = engine.Engine._admit

    def admit(self):
        start = time.perf_counter()
        original_admit(self)
        admitting[-1] += time.perf_counter() - start

    engine.Engine._admit = admit
    long_prompts = [torch.randint(0, vocab, (1024,), generator=g).tolist() for _ in range(4)]
    one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=5)
    calls = {"shared": lambda: generate(model, long_prompts[:1],
                                        dataclasses.replace(one, n_samples=4), vocab),
             "separate": lambda: generate(model, long_prompts, one, vocab)}
    prefill, whole = {}, {}
    for name, call in calls.items():
        for _ in range(3):
            admitting.append(0.0)
            seconds, _ = timed(call)
            prefill[name] = min(prefill.get(name, seconds), admitting[-1])
            whole[name] = min(whole.get(name, seconds), seconds)
    engine.Engine._admit = original_admit
    return dict(continuous=max(rates["continuous"]), static=max(rates["static"]),
                mean_length=sum(lengths) / len(lengths), longest=max(lengths),
                prefill=prefill, whole=whole)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--teacher-layers", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true", help="the rollout figures only")
    opt = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc in the spawned workers

    from megatron_tropd.runtime.testing import run_distributed

    student, teacher = _archs(opt)
    print(f"student {student.hidden_size} wide x {student.num_layers} layers, teacher "
          f"{teacher.hidden_size} wide x {teacher.num_layers} layers, vocabulary "
          f"{student.vocab_size}, fp32, TP=2; load average {os.getloadavg()[0]:.1f}", flush=True)
    figures = {}
    with tempfile.TemporaryDirectory() as root:
        for name, arch in (("student", student), ("teacher", teacher)):
            with open(os.path.join(root, f"{name}.json"), "w") as f:
                json.dump(arch.to_hf_config(), f)
        if not opt.skip_memory:
            small, _ = _memory_run(opt, root, 8, 256, budget=512, slots=8)
            large, _ = _memory_run(opt, root, 32, 256, budget=512, slots=8)
            figures["batch_memory_ratio"] = large / small
            errors = []
            for row in (1024, 2048, 4096):
                peak, expected = _memory_run(opt, root, 1, row, budget=row, slots=2)
                errors.append(abs(expected - peak) / peak)
            figures["plan_error"] = max(errors)
        rollout = run_distributed(_rollout_worker, world_size=2, tp=2, args=(opt, root),
                                  timeout=3600)[0]
    prefill, whole = rollout["prefill"], rollout["whole"]
    print(f"rollout: 64 rows, response lengths mean {rollout['mean_length']:.1f}, longest "
          f"{rollout['longest']}; continuous {rollout['continuous']:.1f} tok/s, static "
          f"{rollout['static']:.1f} tok/s; 4 x 1k-token contexts admitted: shared "
          f"{prefill['shared']:.2f} s, separate {prefill['separate']:.2f} s (whole calls "
          f"{whole['shared']:.2f} s and {whole['separate']:.2f} s: "
          f"{whole['separate'] / whole['shared']:.2f}x)", flush=True)
    figures["continuous_vs_static"] = rollout["continuous"] / rollout["static"]
    figures["shared_prefill_speedup"] = prefill["separate"] / prefill["shared"]
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    sys.exit(main())
