"""Training-step throughput of on-policy distillation: ours against TRL's trainers on the same
teacher, student, prompts and work per iteration, interleaved in one run so machine drift cancels.

    pip install -e ".[bench]"        # TRL 1.16 (keeps the torch you have)
    python benchmarks/vs_trl.py [--pair toy|large] [--repeats 3] [--iterations 6] \\
        [--prompts 4] [--samples 4] [--new-tokens 32] [--device cpu|cuda]

Pairs: `toy`, the embedded HF teacher and student of `examples/toy` (595k / 126k parameters,
vocabulary 20); `large`, a random Qwen3 pair built here from configs, student 52M (hidden 512,
6 layers) and teacher 146M (hidden 768, 14 layers) parameters, one vocabulary of 32000 ids.

Work per iteration, identical for every trainer: `--prompts` prompts of `--prompt-length` random
token ids (the same prompts in the same order), `--samples` sampled responses each at temperature
1, `--new-tokens` new tokens per response (the benchmark tokenizer's end-of-sequence id is an
extra vocabulary row with zero weights, `with_eos_row`: practically never sampled, so responses do
not stop early and no trainer gets shorter sequences by chance), one forward-only teacher pass, one forward/backward of the student over the
whole batch, one Adam step (lr 1e-6, no weight decay, gradient clipping at 1.0), fp32, no
gradient checkpointing, dropout off. Runs:

  trl_distill   `trl.DistillationTrainer`, beta=1 (full-vocabulary reverse KL), one process with
                `--trl-threads` threads (default: all cores), its own defaults otherwise
                (transformers `generate` with its KV cache, chunked divergence loss).
  trl_gkd       `trl.experimental.gkd.GKDTrainer`, lmbda=1 (always on-policy), beta=1; same.
  ours_opd      ours, `--distill-method opd` (reverse KL through the sampled token's
                log-ratio, the usual on-policy estimator), `--nproc` processes of one thread
                each (CPU: 2, data parallel; `--tp 2` for tensor parallel).
  ours_rkl      ours, `--distill-method jsd --jsd-beta 1`: the full-vocabulary reverse KL that
                TRL's beta=1 computes, the same objective term for term.

Each run trains `--iterations` iterations in a fresh trainer; the first is warm-up and dropped.
Seconds per iteration are the wall time between consecutive iterations' ends (ours: the
trainer's own log; TRL: a `TrainerCallback`), so rollout, scoring, update and bookkeeping all
count. Runs alternate `--repeats` times; a run's figure is its median iteration, a trainer's the
best of its runs (other processes only ever slow a run down; medians are printed too). Tokens
per second: generated (= trained) response tokens per second. Last line:
`step_speedup_vs_trl=<ours_opd tokens/s / the faster TRL trainer's>`.

`--device cuda`: TRL on the GPU, ours on one process (NCCL); fp32 as on CPU.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
# Imported before the spawned workers enable our CPU compatibility layer, which replaces
# torch.cuda.Stream (transformers evaluates `torch.cuda.Stream | None` on import).
from transformers import TrainerCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "examples", "toy")
LARGE = {  # Qwen3, as the toy pair, at about 50M / 150M parameters
    "student": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "teacher": dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=14,
                    num_attention_heads=12, num_key_value_heads=4, head_dim=64),
}
LARGE_VOCAB = 32000
LR = 1e-6


# --- the shared inputs: HF models, tokenizer, prompts ---------------------------------------------


def large_pair(root):
    """Random Qwen3 student and teacher saved as HF checkpoints under `root`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dirs = {}
    for role, shape in LARGE.items():
        torch.manual_seed(0 if role == "student" else 1)
        config = Qwen3Config(vocab_size=LARGE_VOCAB, max_position_embeddings=512,
                             tie_word_embeddings=False, rope_theta=10000.0, **shape)
        model = Qwen3ForCausalLM(config)
        dirs[role] = os.path.join(root, role)
        model.save_pretrained(dirs[role])
        print(f"large {role}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
              flush=True)
    return dirs


def word_tokenizer(root, vocab_size):
    """An HF tokenizer whose text is the token ids ("t3 t17 ..."), with an end-of-sequence id
    (`vocab_size`) on the zero row `with_eos_row` adds: responses run to the token limit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["</s>"] = vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                        pad_token="t0", unk_token="t0", padding_side="left")
    path = os.path.join(root, "tokenizer")
    tokenizer.save_pretrained(path)
    return path


def pair(name, root):
    """HF directories of the `name` pair's student and teacher, each with the benchmark's
    end-of-sequence row added (`with_eos_row`), and their vocabulary size without it."""
    if name == "toy":
        with open(os.path.join(TOY, "student", "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        dirs, vocab = {r: os.path.join(TOY, r) for r in ("student", "teacher")}, vocab
    else:
        dirs, vocab = large_pair(root), LARGE_VOCAB
    return {role: with_eos_row(path, os.path.join(root, f"{role}-eos"))
            for role, path in dirs.items()}, vocab


def with_eos_row(src, dst):
    """The HF model at `src` saved at `dst` with one more vocabulary id, the benchmark tokenizer's
    end-of-sequence: its embedding and output rows are zero, so its logit is 0 beside the model's
    own (the peaked toy models practically never sample it; the random large pair with probability
    about 1/32001 per token). The tokenizer then has no id the models lack, as the trainer checks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    eos = model.config.vocab_size
    model.resize_token_embeddings(eos + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[eos].zero_()
        model.get_output_embeddings().weight[eos].zero_()
    model.save_pretrained(dst)
    return dst


def write_prompts(root, opt, vocab_size, seed=0):
    """A JSONL of enough prompts for every iteration, `opt.prompt_length` random ids each (one
    length: no trainer's batch holds more padding than another's)."""
    g = torch.Generator().manual_seed(seed)
    path = os.path.join(root, "prompts.jsonl")
    with open(path, "w") as f:
        for _ in range(opt.prompts * (opt.iterations + 1)):
            ids = torch.randint(1, vocab_size, (opt.prompt_length,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids)}) + "\n")
    return path


def megatron_checkpoints(pair_dirs, root):
    """Our checkpoints of the HF pair (converted at TP=1; they load at any TP)."""
    from megatron_tropd.runtime.testing import run_distributed

    ckpt = {}
    for role, hf_dir in pair_dirs.items():
        ckpt[role] = os.path.join(root, f"megatron-{role}")
        run_distributed(_convert, world_size=1, args=(hf_dir, ckpt[role]))
    return ckpt


# --- ours -----------------------------------------------------------------------------------------


def _convert(hf_dir, out_dir):
    from megatron_tropd.checkpoint.conversion import hf_to_megatron

    hf_to_megatron(hf_dir, out_dir)


def _ours_worker(argv):
    from megatron_tropd import arguments, train

    run = train.train(arguments.parse_args(argv))
    return [h["iteration_s"] for h in run.history]


def ours(argv, nproc, tp):
    from megatron_tropd.runtime.testing import run_distributed

    per_rank = run_distributed(_ours_worker, world_size=nproc, tp=tp, args=(argv,))
    return next(times for times in reversed(per_rank) if times)  # the logging (last) rank's


def ours_argv(opt, ckpt, tokenizer, prompts_file, vocab_size, method):
    rows = opt.prompts * opt.samples
    dp = opt.nproc // opt.tp
    return [
        "--student-load", ckpt["student"], "--teacher-load", ckpt["teacher"],
        "--tokenizer", tokenizer, "--prompts", prompts_file, "--prompt-template", "plain",
        "--tensor-model-parallel-size", str(opt.tp), *method,
        "--train-iters", str(opt.iterations), "--prompts-per-iteration", str(opt.prompts),
        "--samples-per-prompt", str(opt.samples), "--micro-batch-size", str(rows // dp),
        "--max-new-tokens", str(opt.new_tokens), "--temperature", "1.0",
        "--lr", str(LR), "--weight-decay", "0", "--clip-grad", "1.0",
        "--log-interval", str(10**6), "--teacher-topk", str(min(8, vocab_size)),
    ]


# --- TRL ------------------------------------------------------------------------------------------


class StepTimes(TrainerCallback):
    """Wall time between the ends of consecutive optimiser steps (the first: from its start)."""

    def __init__(self):
        self.times, self.last = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.last is None:
            self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def _trl_common(opt, out_dir):
    return dict(
        output_dir=out_dir, per_device_train_batch_size=opt.prompts * opt.samples,
        gradient_accumulation_steps=1, max_steps=opt.iterations, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, bf16=False,
        fp16=False, gradient_checkpointing=False, temperature=1.0, beta=1.0, seed=0,
        logging_steps=10**6, save_strategy="no", report_to=[], disable_dropout=True,
        use_cpu=opt.device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
    )


def _hf_models(pair_dirs, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    student, teacher = (AutoModelForCausalLM.from_pretrained(pair_dirs[r], dtype=torch.float32)
                        for r in ("student", "teacher"))
    return student, teacher, tokenizer


def trl_distill(opt, pair_dirs, tokenizer_dir, prompts):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student, teacher, tokenizer = _hf_models(pair_dirs, tokenizer_dir)
    # One prompt per row and no generations-per-prompt option: each prompt's samples are
    # consecutive rows, kept in order, so a batch is `--prompts` prompts x `--samples`.
    rows = [p for p in prompts for _ in range(opt.samples)]
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(**_trl_common(opt, out), max_completion_length=opt.new_tokens,
                                    shuffle_dataset=False)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=Dataset.from_dict({"prompt": rows}),
                                      processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return timer.times


def trl_gkd(opt, pair_dirs, tokenizer_dir, prompts):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher, tokenizer = _hf_models(pair_dirs, tokenizer_dir)
    student.generation_config.eos_token_id = None  # as for the other trainers: no early stop
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    rows = [i for i in ids for _ in range(opt.samples)]

    def collate(examples):
        # GKD's default collator renders chat messages; the prompts are token ids already, all
        # of one length. With lmbda=1 the step replaces input ids and labels by the generated
        # ones; `labels` here only give the Trainer its token count (the loss divides by it):
        # the number of tokens that will be generated.
        prompt = torch.tensor([e["prompt_ids"] for e in examples])
        ones = torch.ones_like(prompt)
        return dict(prompts=prompt, prompt_attention_mask=ones, input_ids=prompt,
                    attention_mask=ones, labels=torch.zeros(len(examples), opt.new_tokens,
                                                            dtype=torch.long))

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(**_trl_common(opt, out), lmbda=1.0, max_new_tokens=opt.new_tokens)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                             train_dataset=Dataset.from_dict({"prompt_ids": rows}),
                             processing_class=tokenizer, data_collator=collate, callbacks=[timer])
        # shuffle off, as for DistillationTrainer: every run sees the prompts in the same order
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(
            trainer.train_dataset)
        trainer.train()
    return timer.times


# --- the comparison -------------------------------------------------------------------------------


def add_work_arguments(parser):
    """The models, the work per iteration and our layout (shared with `step_profile.py`)."""
    parser.add_argument("--pair", choices=("toy", "large"), default="toy")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, default=None, help="our processes (cpu: 2, cuda: 1)")
    parser.add_argument("--tp", type=int, default=1, help="our tensor-parallel size")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_work_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6,
                        help="per run; the first is warm-up (ours is steady from the third)")
    parser.add_argument("--trl-threads", type=int, default=None,
                        help="torch threads of the TRL process (default: one per core)")
    parser.add_argument("--runs", default="trl_distill,trl_gkd,ours_opd,ours_rkl")
    opt = parser.parse_args()
    if opt.iterations < 2 or opt.repeats < 1:
        parser.error("--iterations must be at least 2 (the first is warm-up) and --repeats at "
                     "least 1")
    opt.nproc = opt.nproc or (2 if opt.device == "cpu" else 1)
    if opt.trl_threads:
        torch.set_num_threads(opt.trl_threads)

    work = tempfile.TemporaryDirectory()
    root = work.name
    pair_dirs, vocab = pair(opt.pair, root)
    tokenizer_dir = word_tokenizer(root, vocab)
    prompts_file = write_prompts(root, opt, vocab)
    prompts = [json.loads(line)["prompt"] for line in open(prompts_file)]
    ckpt = megatron_checkpoints(pair_dirs, root)

    runners = {
        "trl_distill": lambda: trl_distill(opt, pair_dirs, tokenizer_dir, prompts),
        "trl_gkd": lambda: trl_gkd(opt, pair_dirs, tokenizer_dir, prompts),
        "ours_opd": lambda: ours(ours_argv(opt, ckpt, tokenizer_dir, prompts_file, vocab,
                                           ["--distill-method", "opd"]), opt.nproc, opt.tp),
        "ours_rkl": lambda: ours(ours_argv(opt, ckpt, tokenizer_dir, prompts_file, vocab,
                                           ["--distill-method", "jsd", "--jsd-beta", "1"]),
                                 opt.nproc, opt.tp),
    }
    names = opt.runs.split(",")
    tokens = opt.prompts * opt.samples * opt.new_tokens
    print(f"pair {opt.pair}, {opt.prompts} prompts x {opt.samples} samples x {opt.new_tokens} new "
          f"tokens = {tokens} tokens per iteration; device {opt.device}; TRL threads "
          f"{torch.get_num_threads()}, ours {opt.nproc} processes (TP={opt.tp}); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    seconds = {name: [] for name in names}  # per run: its median iteration
    for repeat in range(opt.repeats):
        for name in names:
            times = runners[name]()[1:]
            seconds[name].append(statistics.median(times))
            print(f"repeat {repeat} {name:12s} {seconds[name][-1]:8.3f} s/it "
                  f"{tokens / seconds[name][-1]:9.1f} tok/s  (iterations: "
                  f"{' '.join(f'{t:.3f}' for t in times)})", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    best = {n: min(s) for n, s in seconds.items()}
    median = {n: statistics.median(s) for n, s in seconds.items()}
    for name in names:
        print(f"{name:12s} best {best[name]:8.3f} s/it {tokens / best[name]:9.1f} tok/s   "
              f"median {median[name]:8.3f} s/it {tokens / median[name]:9.1f} tok/s")
    trl_names = [n for n in names if n.startswith("trl")]
    if trl_names and "ours_opd" in names:
        fastest = min(trl_names, key=best.get)
        if "ours_rkl" in names:
            print(f"same objective: ours_rkl / {fastest} = {best[fastest] / best['ours_rkl']:.2f} "
                  f"(medians {median[fastest] / median['ours_rkl']:.2f})")
        print(f"medians: ours_opd / {fastest} = {median[fastest] / median['ours_opd']:.2f}")
        print(f"step_speedup_vs_trl={best[fastest] / best['ours_opd']:.2f}")
    work.cleanup()


if __name__ == "__main__":
    sys.exit(main())
