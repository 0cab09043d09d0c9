"""Memory per GPU of a distillation run, before it is started: what each component takes on the
busiest rank, whether it fits, and the largest rollout batch and micro-batch token budget that do.

    python tools/plan_memory.py --student qwen3-1.7b --teacher qwen3-8b --gpus 8 \\
        --gpu-memory-gib 80 --tensor-model-parallel-size 2 --bf16 --prompts-per-iteration 128 \\
        --samples-per-prompt 4 --prefix-source online --max-new-tokens 8192 \\
        --rollout-batch-size 32 --max-tokens-per-micro-batch 16384

Every figure is a count of the tensors the code allocates, times their element size:

- resident for the whole run: student weights, gradients (megatron DDP's fp32 buffer), optimizer
  states (fp32 master weights with bf16 parameters, Adam's two moments; divided over data-parallel
  ranks with the distributed optimizer), teacher weights, and the batch's token record (O(k) per
  token, `megatron_tropd.tokens`);
- one phase at a time, each freed before the next: the rollout (the KV cache of the rows in
  flight, one prefill forward of at most the token budget, the sampler's temporaries and, on a
  CPU, the decode's packed copies of the weights), the teacher's scoring pass (one micro-batch,
  forward only: one layer's temporaries and the logits of its scored tokens), and the student
  update (the activations one micro-batch saves for backward in every layer of the stage, times the
  micro-batches 1F1B keeps in flight, the logits with their gradients, the teacher's logits when
  the loss needs its full distribution).

Attention is the fused kind (TransformerEngine's on GPU, `models.attention` elsewhere): memory
linear in the sequence, no `[T, T]` term. Rows are taken at their longest (prompt of
--max-prompt-length, a teacher prefix of --max-new-tokens on guided rows, --max-new-tokens
sampled). Not counted: the CUDA context and NCCL's own buffers (about 1 GiB per GPU together),
allocator fragmentation, and the framework's fixed overhead, which the margin is for.
"""

import dataclasses
import os
from typing import Dict, List, Optional

from megatron_tropd.errors import UserError
from megatron_tropd.models.arch import ArchitectureError, ModelArch
from megatron_tropd.models.builder import check_parallel_layout, padded_vocab_size
from megatron_tropd.models.sizes import (layer_forward_elements, layer_linear_params,
                                         layer_saved_elements, stage_params)

GIB = 2**30
MODEL_STATE = ("student weights", "student gradients", "optimizer states", "teacher weights")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class PlanError(UserError):
    """A plan that cannot be made (unknown model, impossible layout, nothing fits): one line."""


def shipped_configs() -> List[str]:
    """Names of the model configs that ship with the package (`megatron_tropd/configs`)."""
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".json"))


def load_arch(name_or_path: str) -> ModelArch:
    """A shipped config by name (`qwen3-1.7b`), or an HF `config.json` / checkpoint directory."""
    if os.path.exists(name_or_path):
        return ModelArch.from_file(name_or_path)
    name = name_or_path.lower()
    if name not in shipped_configs():
        raise PlanError(f"unknown model config {name_or_path!r}: give a config.json, a model "
                        f"directory or one of {', '.join(shipped_configs())}")
    return ModelArch.from_file(os.path.join(CONFIG_DIR, f"{name}.json"))


@dataclasses.dataclass
class PlanConfig:
    """The run's shapes (the trainer's flags of the same names) and the machine.

    Args:
        prefix_rows: teacher-prefix (guided) rows per prompt, beside `samples_per_prompt`.
        micro_batch_size: rows per micro-batch (None: only the token budget limits them).
        max_tokens_per_micro_batch: None: micro-batches of `micro_batch_size` longest rows.
        teacher_topk: k of the teacher's top-k signals kept per token (0: the method needs none).
        teacher_full: the loss needs the teacher's full distribution (jsd, the KL trust region).
        device: "gpu", or "cpu" (the decode's MKL-packed weight copies, fp32 only; RMSNorm
            without a fused kernel).
    """

    student: ModelArch
    teacher: ModelArch
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    bf16: bool = True
    distributed_optimizer: bool = False
    prompts_per_iteration: int = 8
    samples_per_prompt: int = 4
    prefix_rows: int = 0
    max_prompt_length: int = 512
    max_new_tokens: int = 256
    rollout_batch_size: int = 64
    micro_batch_size: Optional[int] = 4
    max_tokens_per_micro_batch: Optional[int] = None
    teacher_topk: int = 64
    teacher_full: bool = False
    device: str = "gpu"

    @property
    def data_parallel(self) -> int:
        return self.gpus // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def element(self) -> int:
        """Bytes of a parameter / activation element."""
        return 2 if self.bf16 else 4

    @property
    def rows_per_rank(self) -> int:
        prompts = self.prompts_per_iteration // self.data_parallel
        return prompts * (self.samples_per_prompt + self.prefix_rows)

    @property
    def longest_row(self) -> int:
        prefix = self.max_new_tokens if self.prefix_rows else 0
        return self.max_prompt_length + prefix + self.max_new_tokens

    @property
    def response_share(self) -> float:
        """The scored tokens' share of a row at its longest (a guided row's prefix is scored)."""
        return (self.longest_row - self.max_prompt_length) / self.longest_row


def check(config: PlanConfig):
    """One-line `PlanError`s for layouts and flags that cannot work."""
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    if min(tp, pp, config.gpus) < 1 or config.gpus % (tp * pp):
        raise PlanError(f"{config.gpus} GPUs do not divide into tensor-model-parallel {tp} x "
                        f"pipeline-model-parallel {pp}")
    try:
        check_parallel_layout(config.student, tp, pp, "student")
        check_parallel_layout(config.teacher, tp, pp, "teacher")
    except ArchitectureError as e:
        raise PlanError(str(e)) from None
    if config.prompts_per_iteration % config.data_parallel:
        raise PlanError(f"--prompts-per-iteration {config.prompts_per_iteration} is not "
                        f"divisible by the data-parallel size {config.data_parallel}")
    budget = config.max_tokens_per_micro_batch
    if budget is not None and budget < config.max_prompt_length + config.max_new_tokens:
        raise PlanError(f"--max-tokens-per-micro-batch {budget} is below one row of "
                        f"--max-prompt-length + --max-new-tokens")
    if config.micro_batch_size is None and budget is None:
        raise PlanError("give --micro-batch-size or --max-tokens-per-micro-batch")


# --- what one rank holds --------------------------------------------------------------------------


def kv_bytes_per_token(arch: ModelArch, config: PlanConfig) -> int:
    """Keys and values of one token in one stage's layers on one rank."""
    layers = arch.num_layers // config.pipeline_parallel
    kv_heads = arch.num_query_groups // config.tensor_parallel
    return layers * 2 * kv_heads * arch.head_dim * config.element


def components(config: PlanConfig, stage: int) -> Dict[str, float]:
    """Bytes of every component on a rank of pipeline stage `stage` (see the module docstring).
    Keys starting with `rollout:`, `teacher:` and `update:` belong to one phase each."""
    tp, pp, e = config.tensor_parallel, config.pipeline_parallel, config.element
    student, teacher = config.student, config.teacher
    s_params, t_params = stage_params(student, tp, pp, stage), stage_params(teacher, tp, pp, stage)
    last = stage == pp - 1
    vocab_shard = padded_vocab_size(student.vocab_size, tp) // tp
    optimizer = (12 if config.bf16 else 8) * s_params  # fp32 master (bf16 only), Adam m and v
    if config.distributed_optimizer:
        optimizer /= config.data_parallel
    tokens = config.rows_per_rank * config.longest_row
    scored = int(tokens * config.response_share)
    # the rows' ids and their micro-batches (ids, scored flags, record index); per scored token
    # the record's id, on-policy flag, lp_S_old and sampler entropy and, on the last stage, lp_T,
    # the teacher's entropy, the trust uniform (float64), the selection flag and k top-k
    # log-probs with int32 ids
    per_scored = 8 + 1 + 4 + 4 + (4 + 4 + 8 + 1 + 8 * config.teacher_topk if last else 0)
    out = {
        "student weights": s_params * e,
        "student gradients": s_params * 4,
        "optimizer states": optimizer,
        "teacher weights": t_params * e,
        "token ids and record of the batch": tokens * (8 + 8 + 1) + scored * (per_scored + 8),
    }

    slots = min(config.rollout_batch_size, config.rows_per_rank)
    row = config.longest_row
    # the largest micro-batch: the token budget filled (by rows of any length; a row longer than
    # the budget alone), or --micro-batch-size rows at their longest
    budget = config.max_tokens_per_micro_batch
    rows_limit = None if config.micro_batch_size is None else config.micro_batch_size * row
    micro_tokens = max(row, min(t for t in (budget, rows_limit) if t is not None))
    micro_scored = int(micro_tokens * config.response_share)
    prefill = min(micro_tokens, slots * row)
    out["rollout: KV cache"] = (slots + 1) * row * kv_bytes_per_token(student, config)
    out["rollout: prefill"] = prefill * layer_forward_elements(student, tp) * e
    # logits, and the sampler's float64 scores, exponentials and cumulative sums
    out["rollout: sampling"] = (slots * vocab_shard * (e + 3 * 8) if last else 0) + \
        config.rows_per_rank * config.max_new_tokens * 16
    if config.device == "cpu" and not config.bf16:  # DecodeLinear's packed float32 weights
        packed = student.num_layers // pp * layer_linear_params(student, tp)
        out["rollout: packed decode weights"] = 4 * (
            packed + (vocab_shard * student.hidden_size if last else 0))

    out["teacher scoring: one micro-batch's forward"] = micro_tokens * (
        teacher.hidden_size + layer_forward_elements(teacher, tp)) * e
    if last:
        out["teacher scoring: logits"] = micro_scored * vocab_shard * e
        out["teacher scoring: top-k all-gather"] = micro_scored * config.teacher_topk * tp * 12

    # The update's peak is at one of two moments. When backward starts, every layer's saved
    # activations are there (for each micro-batch 1F1B keeps in flight), with the logits, their
    # gradients (each vocabulary-parallel function's backward returns one of their shape, summed
    # by autograd) and the output layer's weight gradient, which exists whole before megatron's
    # DDP hook adds it to the fp32 buffer. When backward ends the activations are gone and the
    # embedding's weight gradient arrives; a tied embedding is used twice on one stage, so
    # autograd has held the output layer's gradient until then and sums the two.
    start, end = "update (backward starts): ", "update (backward ends): "
    in_flight = min(pp - stage, config.rows_per_rank)
    layers = student.num_layers // pp
    weight = vocab_shard * student.hidden_size * e
    composite_norms = config.device == "cpu"
    final_norm = (2 if composite_norms else 1) * student.hidden_size if last else 0
    out[start + "saved activations"] = in_flight * micro_tokens * (
        layers * layer_saved_elements(student, tp, composite_norms) + final_norm) * e
    out[start + "one layer's backward"] = micro_tokens * layer_forward_elements(student, tp) * e
    if last:
        out[start + "logits and their gradients"] = 3 * micro_scored * vocab_shard * e
        out[start + "output layer's weight gradient"] = weight
    if config.teacher_full:  # the teacher's forward inside the student's, its logits kept
        out[start + "teacher's forward"] = micro_tokens * layer_forward_elements(teacher, tp) * e
        if last:
            out[start + "teacher's logits"] = micro_scored * vocab_shard * e
    if stage == 0:
        tied_here = student.tie_word_embeddings and pp == 1
        out[end + "embedding's weight gradient"] = (2 if tied_here else 1) * weight
    return out


@dataclasses.dataclass
class Plan:
    """The busiest stage's components (bytes), its resident and phase totals, and the peak."""

    config: PlanConfig
    stage: int
    parts: Dict[str, float]

    @property
    def resident(self) -> float:
        return sum(v for k, v in self.parts.items() if ":" not in k)

    @property
    def model_state(self) -> float:
        """Weights, gradients and optimizer states: what a run holds before its first batch."""
        return sum(self.parts[k] for k in MODEL_STATE)

    def phase(self, name: str) -> float:
        return sum(v for k, v in self.parts.items() if k.startswith(name + ":"))

    @property
    def phases(self) -> Dict[str, float]:
        names = dict.fromkeys(k.split(":")[0] for k in self.parts if ":" in k)
        return {name: self.phase(name) for name in names}

    @property
    def peak(self) -> float:
        return self.resident + max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.config.gpu_memory_gib * GIB


def plan(config: PlanConfig) -> Plan:
    """The plan of the stage whose peak is highest."""
    check(config)
    plans = [Plan(config, s, components(config, s)) for s in range(config.pipeline_parallel)]
    return max(plans, key=lambda p: p.peak)


def largest_fitting(config: PlanConfig, field: str, low: int, high: int) -> Optional[int]:
    """The largest value of `field` in [low, high] at which the plan fits (None: not even low);
    the peak grows with each of these fields, so bisection finds it."""
    def fits(value):
        return plan(dataclasses.replace(config, **{field: value})).fits

    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def config_from_args(args, student: ModelArch, teacher: ModelArch, gpus: int,
                     gpu_memory_gib: float, device: str = "gpu") -> PlanConfig:
    """The plan's inputs from the trainer's parsed flags (`arguments.parse_args`)."""
    from megatron_tropd.arguments import distill_config, prefix_rows
    from megatron_tropd.distill.losses import needs

    method_needs = needs(distill_config(args))
    return PlanConfig(
        student=student, teacher=teacher, tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size, gpus=gpus,
        gpu_memory_gib=gpu_memory_gib, bf16=args.bf16,
        distributed_optimizer=args.use_distributed_optimizer,
        prompts_per_iteration=args.prompts_per_iteration,
        samples_per_prompt=args.samples_per_prompt,
        prefix_rows=prefix_rows(args),
        max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
        rollout_batch_size=args.rollout_batch_size, micro_batch_size=args.micro_batch_size,
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        teacher_topk=args.teacher_topk if method_needs.topk else 0,
        teacher_full=method_needs.teacher_full, device=device)


def require_fit(config: PlanConfig):
    """A one-line `PlanError` when the plan does not fit in the GPU's memory."""
    p = plan(config)
    if p.fits:
        return
    smallest = dataclasses.replace(config, rollout_batch_size=1, micro_batch_size=1,
                                   max_tokens_per_micro_batch=None)
    if not plan(smallest).fits:
        raise PlanError(f"does not fit at any batch setting: the models' state alone is "
                        f"{p.model_state / GIB:.1f} GiB per GPU and one row of "
                        f"{config.longest_row} tokens takes the peak to "
                        f"{plan(smallest).peak / GIB:.1f} GiB, more than --gpu-memory-gib "
                        f"{config.gpu_memory_gib:g}: use more GPUs, a larger tensor- or "
                        f"pipeline-parallel size, the distributed optimizer or shorter rows")
    raise PlanError(f"the peak is {p.peak / GIB:.1f} GiB per GPU, more than --gpu-memory-gib "
                    f"{config.gpu_memory_gib:g}: lower --rollout-batch-size or "
                    f"--max-tokens-per-micro-batch (the largest that fit are above)")


def report(config: PlanConfig) -> str:
    """The printed plan: components, phases, the verdict and the largest settings that fit."""
    p = plan(config)
    lines = [f"memory plan per GPU (pipeline stage {p.stage}, the busiest): "
             f"TP={config.tensor_parallel} PP={config.pipeline_parallel} "
             f"DP={config.data_parallel}, {'bf16' if config.bf16 else 'fp32'}, "
             f"{config.rows_per_rank} rows of up to {config.longest_row} tokens per rank"]
    for name, value in p.parts.items():
        lines.append(f"  {name:56s} {value / GIB:8.2f} GiB")
    lines.append(f"  {'resident':56s} {p.resident / GIB:8.2f} GiB")
    for name, value in p.phases.items():
        lines.append(f"  {'peak in ' + name:56s} {(p.resident + value) / GIB:8.2f} GiB")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"peak {p.peak / GIB:.2f} GiB of {config.gpu_memory_gib:g} GiB: {verdict}")
    slots = largest_fitting(config, "rollout_batch_size", 1, config.rows_per_rank)
    row = config.max_prompt_length + config.max_new_tokens
    budget = largest_fitting(dataclasses.replace(config, micro_batch_size=None),
                             "max_tokens_per_micro_batch", row, 1 << 22)
    lines.append(f"largest --rollout-batch-size that fits: {slots or 'none'}; largest "
                 f"--max-tokens-per-micro-batch that fits: {budget or 'none'} (one row is {row})")
    return "\n".join(lines)
