"""Where an iteration's batch comes from, one source per mode, so the loop reads the same for both:
`next(step, timer)` gives this rank's rows in micro-batches with their record filled in, and the
batch-level metrics; `per_token_loss` is the mode's loss of one micro-batch; `paired_teacher` is the
teacher whose logits the update's forward needs alongside the student's (JSD, the KL trust region),
or None.

Distillation: prompts -> (teacher prefixes) -> student rollouts -> micro-batches -> frozen teacher
scoring -> (lp_S_old recomputed) -> trust-test uniforms and token selection.
SFT: prompt + response examples -> micro-batches.
"""

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_tropd import arguments
from megatron_tropd.distill import losses
from megatron_tropd.distill.inputs import with_student_inputs
from megatron_tropd.distill.scoring import recompute_old_logprobs
from megatron_tropd.distill.teacher import score as teacher_score
from megatron_tropd.distill.token_selection import counts_selected, select_tokens
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
from megatron_tropd.rollout import prefix as prefix_schedule
from megatron_tropd.rollout.generate import SamplingParams, generate
from megatron_tropd.runtime import faults
from megatron_tropd.runtime.initialize import comm_device
from megatron_tropd.tasks.verifier import CORRECT
from megatron_tropd.tokens import TokenBatch, TokenRecord, plan_micro_batches

# Keys of the trust-test uniforms: distinct from the sampler's, the same (sample id, response
# position) indexing, so the draws do not depend on the layout or the batch's padding.
TRUST_SEED_OFFSET = 0x7F4A7C15


def micro_batches_of(args, batch: TokenBatch, pad_id: int):
    """The batch's rows in micro-batches of at most --micro-batch-size rows and
    --max-tokens-per-micro-batch tokens, longest rows first (teacher scoring and the update)."""
    plan = plan_micro_batches(batch.lengths, args.micro_batch_size,
                              args.max_tokens_per_micro_batch)
    return [batch.micro_batch(rows, pad_id) for rows in plan]


@dataclasses.dataclass
class DistillationBatches:
    """Rollouts of this rank's prompts by the student, scored by the frozen teacher."""

    args: object
    student: torch.nn.Module
    teacher: torch.nn.Module
    config: losses.DistillConfig
    sampler: object                     # the PromptSampler (TrainState.sampler)
    prompts: list
    vocab_size: int
    pad_id: int
    stop_ids: tuple
    dp_rank: int
    tokenizer: object
    verifier: Optional[Callable[[str, str], str]] = None  # --verifier: (response, answer) -> outcome
    # (prompts, global index of the first of them) -> one teacher response per prompt
    teacher_responses: Optional[Callable[[List[List[int]], int], List[List[int]]]] = None

    def __post_init__(self):
        self.needs = losses.needs(self.config)

    @property
    def paired_teacher(self):
        return self.teacher if self.needs.teacher_full else None

    def next(self, step: int, timer):
        args = self.args
        with timer("rollout"):
            batch, metrics = rollouts(self, step)
        micro_batches = micro_batches_of(args, batch, self.pad_id)
        with timer("teacher"):
            teacher_score(self.teacher, batch, micro_batches, self.vocab_size,
                          args.teacher_topk if self.needs.topk else 0)
        if arguments.recomputes_old_logprobs(args):
            with timer("recompute"):
                recompute_old_logprobs(self.student, batch, micro_batches, self.vocab_size)
        metrics.update(distill_fields(self, batch, step))
        return batch, micro_batches, metrics

    def per_token_loss(self, record: TokenRecord, logits):
        """The per-token loss `[N]` of one micro-batch and its metric sums, from the last stage's
        logits: the student's shard predicting each record entry `[N, V/tp]`, or (student,
        teacher) shards when the method needs the teacher's full distribution."""
        student_logits, teacher_logits = logits if self.needs.teacher_full else (logits, None)
        x = with_student_inputs(record, student_logits, self.vocab_size, self.needs,
                                teacher_logits, jsd_beta=self.config.jsd_beta)
        out = losses.compute_loss(x, self.config)
        return out.per_token, dict(out.metrics)


def rollouts(source: DistillationBatches, step: int):
    """This rank's prompts -> (teacher prefixes) -> student samples. Returns the rollout batch and
    its batch-level metrics."""
    from megatron.core import parallel_state

    args = source.args
    global_position = source.sampler.consumed_samples  # before this iteration's draw
    indices = source.sampler.next_indices()
    faults.point("rollout", step + 1)
    prompts = [source.prompts[i].prompt_ids for i in indices]
    guided = arguments.prefix_rows(args) > 0
    rows_per_prompt = args.samples_per_prompt + arguments.prefix_rows(args)
    first_prompt = global_position + source.dp_rank * len(prompts)
    responses = source.teacher_responses(prompts, first_prompt) if guided else None
    row_prompts, prefixes = [], []
    for i, prompt in enumerate(prompts):
        row_prompts += [prompt] * rows_per_prompt
        prefixes += [[]] * args.samples_per_prompt
        if responses is not None:
            prefixes += prefix_schedule.teacher_prefixes([responses[i]], step,
                                                         args.prefix_anneal_steps)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_ids=source.stop_ids,
                            n_samples=1, seed=args.seed)
    batch = generate(source.student, row_prompts, params, source.vocab_size, prefixes=prefixes,
                     sample_offset=first_prompt * rows_per_prompt, record_entropy=True,
                     rollout_batch_size=args.rollout_batch_size,
                     max_prefill_tokens=args.max_tokens_per_micro_batch)
    record = batch.record
    metrics = {
        "response_length": (torch.tensor(float(sum(batch.student_lengths))),
                            torch.tensor(float(len(row_prompts)))),
        "entropy_student": (record.student_entropy[record.on_policy].sum(),
                            record.on_policy.sum().float()),
    }
    if guided:
        metrics["prefix_alpha"] = (torch.tensor(prefix_schedule.prefix_fraction(
            step, args.prefix_anneal_steps)), torch.tensor(1.0))
    if source.verifier is not None and parallel_state.is_pipeline_last_stage():  # reduced there
        metrics["pass_rate"] = _pass_rate(source, batch, indices)
    return batch, metrics


def _pass_rate(source: DistillationBatches, batch, indices):
    """(correct, checked) over this rank's on-policy rollouts of prompts with an answer (the
    teacher-prefix rows are not the student's own answers)."""
    args = source.args
    rows_per_prompt = args.samples_per_prompt + arguments.prefix_rows(args)
    answered = [(i, source.prompts[index]) for i, index in enumerate(indices)
                if source.prompts[index].answer is not None]
    responses = batch.responses() if answered else []  # nothing decoded without answers
    correct = checked = 0
    for i, example in answered:
        for row in range(i * rows_per_prompt, i * rows_per_prompt + args.samples_per_prompt):
            correct += source.verifier(source.tokenizer.decode(responses[row]),
                                       example.answer) == CORRECT
            checked += 1
    return torch.tensor(float(correct)), torch.tensor(float(checked))


def distill_fields(source: DistillationBatches, batch, step: int):
    """On the last stage, the record's trainer-made fields: the trust test's uniforms and the
    REOPOLD / Entropy-OPD selection over the global batch. Returns the teacher's mean entropy as
    a metric."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage():
        return {}
    needs, record = source.needs, batch.record
    if needs.uniform:
        keys = sampling_keys(source.args.seed + TRUST_SEED_OFFSET, batch.record_sample_ids(),
                             batch.record_positions())
        record.uniform = uniform_from_keys(keys)
    if needs.selection:
        group = parallel_state.get_data_parallel_group()
        record.selected = select_tokens(source.config, step, record, group)
        # REOPOLD averages over its selected tokens; should no rank select any, over every token
        # (the loss is zero then) rather than divide by zero
        if counts_selected(source.config) and _any_over(record.selected, group):
            record.counted = record.selected
    return {"entropy_teacher": (record.teacher_entropy[record.on_policy].sum(),
                                record.on_policy.sum().float())}


def _any_over(mask, group) -> bool:
    """Whether `mask` holds a True on any rank of `group`."""
    flag = mask.any().to(device=comm_device(), dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag)


@dataclasses.dataclass
class SftBatches:
    """Prompt + response examples, the response scored by cross-entropy."""

    args: object
    student: torch.nn.Module
    sampler: object
    examples: list
    vocab_size: int
    pad_id: int
    paired_teacher = None

    def next(self, step: int, timer):
        with timer("data"):
            examples = [self.examples[i] for i in self.sampler.next_indices()]
            device = next(self.student.parameters()).device
            sequences = [torch.tensor(e.input_ids, dtype=torch.long, device=device)
                         for e in examples]
            prompt_lengths = [e.prompt_length for e in examples]
            record = TokenRecord(ids=torch.cat([s[p:] for s, p in zip(sequences, prompt_lengths)]))
            batch = TokenBatch(sequences, prompt_lengths, record)
        metrics = {"sequence_length": (torch.tensor(float(len(record))),
                                       torch.tensor(float(len(examples))))}
        return batch, micro_batches_of(self.args, batch, self.pad_id), metrics

    def per_token_loss(self, record: TokenRecord, logits):
        per_token = -vp.token_log_probs(logits, record.ids, self.vocab_size)
        return per_token, {"sft_loss": (per_token.detach().sum(),
                                        torch.tensor(float(per_token.numel())))}
