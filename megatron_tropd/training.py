"""The training loop: student rollouts -> teacher scoring -> student update (and SFT through the
same update), with metrics and checkpoints. Read `train()` top-down.

    torchrun --nproc-per-node 8 -m megatron_tropd.train --tensor-model-parallel-size 2 \\
        --student-load ckpt/student --teacher-load ckpt/teacher --prompts prompts.jsonl \\
        --distill-method tropd --train-iters 200 --save runs/tropd
    multi-node: torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...

One distillation iteration on every data-parallel rank:
  prompts (this rank's slice of the global batch)
  -> [teacher prefixes, floor(alpha(step) * L_T) tokens]            (TrOPD off-policy guidance)
  -> student rollouts (KV cache, vocabulary-parallel sampling)      -> tokens, lp_S_old
  -> micro-batches by length (row count, token budget)
  -> teacher scoring (frozen, forward-only)                         -> lp_T, top-k, entropy
  -> [lp_S_old recomputed by the training model, forward-only]      (bf16, TransformerEngine)
  -> token selection over the global batch (REOPOLD, Entropy-OPD)
  -> epochs x [forward_backward over micro-batches (the teacher's logits alongside for JSD and
               the KL trust region), token-mean loss over the global batch, finalize grads
               (DDP), clip, optimiser step, LR schedule]
  -> metrics (console + TensorBoard), checkpoint.
"""

import contextlib
import os
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_tropd import arguments, errors, run_setup
from megatron_tropd.checkpoint import checkpointer
from megatron_tropd.distill import losses
from megatron_tropd.distill.inputs import with_student_inputs
from megatron_tropd.distill.scoring import recompute_old_logprobs
from megatron_tropd.distill.teacher import score as teacher_score
from megatron_tropd.distill.token_selection import counts_selected, select_tokens
from megatron_tropd.models.forward import scored_logits
from megatron_tropd.monitor import MetricsLogger
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
from megatron_tropd.rollout import prefix as prefix_schedule
from megatron_tropd.rollout.generate import SamplingParams, generate
from megatron_tropd.runtime import faults
from megatron_tropd.runtime.initialize import (all_reduce_max, comm_device, initialize_distributed,
                                               print_rank_0)
from megatron_tropd.runtime.stopping import StopConditions
from megatron_tropd.tasks.verifier import CORRECT
from megatron_tropd.tokens import TokenBatch, TokenRecord, plan_micro_batches

# Keys of the trust-test uniforms: distinct from the sampler's, the same (sample id, response
# position) indexing, so the draws do not depend on the layout or the batch's padding.
_TRUST_SEED_OFFSET = 0x7F4A7C15


# --- the loop -----------------------------------------------------------------------------------


def main(argv=None):
    """Console entry point. Exit status: 0 when the run finished or stopped early on a signal,
    --exit-duration-in-mins or --exit-interval (a checkpoint saved; the same command resumes);
    2 with a one-line `error: ...` (`errors.run_main`) for bad input of any kind and for a run
    that cannot go on (a checkpoint that cannot be written, too many non-finite steps in a row)."""
    from megatron_tropd.runtime import console

    args = arguments.parse_args(argv)
    console.configure(args.verbose)
    errors.run_main(train, args)


def train(args):
    """Set up, resume if a checkpoint is there, and run `args.train_iters` iterations, or fewer
    when a stop condition (signal, time, --exit-interval) says so after an iteration."""
    stop = StopConditions(args)  # the --exit-duration-in-mins clock starts here
    dp = arguments.validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    checkpointer.check_writable(args.save)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           args.seed)
    lock = checkpointer.SaveDirLock(args.save)  # --save is this run's until it returns
    try:
        return _train(args, stop, dp)
    finally:
        lock.release()


def _train(args, stop, dp):
    """`train` once the process group is up and --save is locked."""
    run = run_setup.setup_run(args)  # models, optimiser, scheduler, data, resumed state
    logger = MetricsLogger(args, run.iteration)
    print_rank_0(f"training {args.mode}"
                 f"{'' if args.mode == 'sft' else ' ' + args.method} for {args.train_iters} "
                 f"iterations from iteration {run.iteration} (DP={dp}, "
                 f"TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size})")
    if args.eval_interval and run.iteration == 0:
        logger.log_eval(run.iteration, heldout_pass_rate(args, run))
    with stop:  # from here on SIGTERM / SIGUSR1 finish the iteration and save
        while run.iteration < args.train_iters:
            step = run.iteration
            timer = PhaseTimer()
            if args.mode == "sft":
                with timer("data"):
                    batch, batch_metrics = sft_batch(args, run)
                micro_batches = micro_batches_of(args, run, batch)
            else:
                with timer("rollout"):
                    batch, batch_metrics = rollouts(args, run, step)
                micro_batches = micro_batches_of(args, run, batch)
                with timer("teacher"):
                    teacher_score(run.teacher, batch, micro_batches, run.vocab_size,
                                  args.teacher_topk if run.needs.topk else 0)
                if arguments.recomputes_old_logprobs(args):
                    with timer("recompute"):
                        recompute_old_logprobs(run.model, batch, micro_batches, run.vocab_size)
                batch_metrics.update(distill_fields(args, run, batch, step))
            with timer("train"):
                totals, grad_norm = update(args, run, batch, micro_batches)
            run.iteration += 1
            sums = _reduce_over_data_parallel({**batch_metrics, **totals})  # one all-reduce
            sums["grad_norm"] = (torch.tensor(grad_norm), torch.tensor(1.0))
            logger.log(run.iteration, sums, timer, run.scheduler)
            if args.eval_interval and run.iteration % args.eval_interval == 0:
                logger.log_eval(run.iteration, heldout_pass_rate(args, run))
            reason = stop.reason(run.iteration)  # collective: every rank stops at one iteration
            if checkpointer.due(args, run.iteration) or (reason and args.save):
                with timer("checkpoint"):  # after the log line: benchmarks/step_profile reads it
                    checkpointer.save(args, run)
            if reason and run.iteration < args.train_iters:
                print_rank_0(f"stopped at iteration {run.iteration} of {args.train_iters} "
                             f"({reason}): " + ("the same command resumes from the checkpoint"
                                                if args.save else "nothing saved (no --save)"))
                break
    logger.close()
    print_rank_0(f"done: {run.iteration} iterations")
    run.history, run.eval_history = logger.history, logger.eval_history
    return run


def heldout_pass_rate(args, run) -> dict:
    """The student's greedy pass@1 (and outcome counts, lengths) on --eval-data, the prompts
    split over data-parallel replicas (collective)."""
    from megatron.core import parallel_state

    from megatron_tropd.evaluate import evaluate

    dp, rank = parallel_state.get_data_parallel_world_size(), run.dp_rank
    return evaluate(run.model, run.tokenizer, run.eval_examples[rank::dp], run.vocab_size,
                    args.max_new_tokens, batch_size=args.rollout_batch_size, seed=args.seed,
                    verifier=run.verifier)


class PhaseTimer(dict):
    """Seconds per phase of one iteration: `with timer("teacher"): ...` adds the block's wall
    time under "teacher"."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - start


# --- distillation batches -----------------------------------------------------------------------


def rollouts(args, run, step):
    """This rank's prompts -> (teacher prefixes) -> student samples. Returns the rollout batch and
    its batch-level metrics."""
    global_position = run.sampler.consumed_samples  # before this iteration's draw
    indices = run.sampler.next_indices()
    faults.point("rollout", step + 1)
    prompts = [run.prompts[i].prompt_ids for i in indices]
    rows_per_prompt = args.samples_per_prompt + arguments.prefix_rows(args)
    local = len(prompts)
    first_prompt = global_position + run.dp_rank * local
    row_prompts, prefixes = [], []
    guided = arguments.prefix_rows(args) > 0
    responses = run.teacher_responses(prompts, first_prompt) if guided else None
    for i, prompt in enumerate(prompts):
        row_prompts += [prompt] * rows_per_prompt
        prefixes += [[]] * args.samples_per_prompt
        if responses is not None:
            prefixes += prefix_schedule.teacher_prefixes([responses[i]], step,
                                                         args.prefix_anneal_steps)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_ids=run.stop_ids,
                            n_samples=1, seed=args.seed)
    batch = generate(run.model, row_prompts, params, run.vocab_size, prefixes=prefixes,
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
    if arguments.prefix_rows(args):
        metrics["prefix_alpha"] = (torch.tensor(prefix_schedule.prefix_fraction(
            step, args.prefix_anneal_steps)), torch.tensor(1.0))
    from megatron.core import parallel_state

    if run.verifier is not None and parallel_state.is_pipeline_last_stage():  # reduced there
        metrics["pass_rate"] = _pass_rate(args, run, batch, indices)
    return batch, metrics


def _pass_rate(args, run, batch, indices):
    """(correct, checked) over this rank's on-policy rollouts of prompts with an answer (the
    teacher-prefix rows are not the student's own answers)."""
    rows_per_prompt = args.samples_per_prompt + arguments.prefix_rows(args)
    answered = [(i, run.prompts[index]) for i, index in enumerate(indices)
                if run.prompts[index].answer is not None]
    responses = batch.responses() if answered else []  # nothing decoded without answers
    correct = checked = 0
    for i, example in answered:
        for row in range(i * rows_per_prompt, i * rows_per_prompt + args.samples_per_prompt):
            correct += run.verifier(run.tokenizer.decode(responses[row]),
                                    example.answer) == CORRECT
            checked += 1
    return torch.tensor(float(correct)), torch.tensor(float(checked))


def micro_batches_of(args, run, batch: TokenBatch):
    """The batch's rows in micro-batches of at most --micro-batch-size rows and
    --max-tokens-per-micro-batch tokens, longest rows first (teacher scoring and the update)."""
    plan = plan_micro_batches(batch.lengths, args.micro_batch_size,
                              args.max_tokens_per_micro_batch)
    return [batch.micro_batch(rows, run.pad_id) for rows in plan]


def distill_fields(args, run, batch, step):
    """On the last stage, the record's trainer-made fields: the trust test's uniforms and the
    REOPOLD / Entropy-OPD selection over the global batch. Returns the teacher's mean entropy as
    a metric."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage():
        return {}
    needs, record = run.needs, batch.record
    if needs.uniform:
        keys = sampling_keys(args.seed + _TRUST_SEED_OFFSET, batch.record_sample_ids(),
                                batch.record_positions())
        record.uniform = uniform_from_keys(keys)
    if needs.selection:
        group = parallel_state.get_data_parallel_group()
        record.selected = select_tokens(run.config, step, record, group)
        # REOPOLD averages over its selected tokens; should no rank select any, over every token
        # (the loss is zero then) rather than divide by zero
        if counts_selected(run.config) and _any_over(record.selected, group):
            record.counted = record.selected
    return {"entropy_teacher": (record.teacher_entropy[record.on_policy].sum(),
                                record.on_policy.sum().float())}


def _any_over(mask, group) -> bool:
    """Whether `mask` holds a True on any rank of `group`."""
    flag = mask.any().to(device=comm_device(), dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag)


# --- SFT batches --------------------------------------------------------------------------------


def sft_batch(args, run):
    """This rank's SFT examples: prompt + response rows, the response scored."""
    examples = [run.sft_examples[i] for i in run.sampler.next_indices()]
    device = next(run.model.parameters()).device
    sequences = [torch.tensor(e.input_ids, dtype=torch.long, device=device) for e in examples]
    prompt_lengths = [e.prompt_length for e in examples]
    record = TokenRecord(ids=torch.cat([s[p:] for s, p in zip(sequences, prompt_lengths)]))
    metrics = {"sequence_length": (torch.tensor(float(len(record))),
                                   torch.tensor(float(len(examples))))}
    return TokenBatch(sequences, prompt_lengths, record), metrics


# --- the student update -------------------------------------------------------------------------


def update(args, run, batch: TokenBatch, micro_batches):
    """`epochs_per_rollout` optimiser steps on `batch`; returns this rank's metric sums over the
    micro-batches (the caller reduces them over data-parallel ranks with the batch's metrics, in
    one all-reduce) and the last step's gradient norm."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    totals = {}
    for _ in range(args.epochs_per_rollout):
        run.ddp.zero_grad_buffer()
        run.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, args, run),
            data_iterator=((mb, batch.record.select(mb.index)) for mb in micro_batches),
            model=[run.ddp], num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=False,
        )
        if _all_finite(run, reduced):
            _, grad_norm, _ = run.optimizer.step()
            faults.point("optimizer", run.iteration + 1)
            run.scheduler.step(increment=1)
            run.nonfinite_steps = 0
        else:
            grad_norm = float("nan")
            _skip_nonfinite_step(args, run)
        for metrics in reduced:
            for name, (total, count) in metrics.items():
                t, c = totals.get(name, (0.0, 0.0))
                totals[name] = (t + total, c + count)
    return totals, float(grad_norm or 0.0)


def _all_finite(run, reduced) -> bool:
    """Whether every micro-batch loss and every gradient is finite, on every rank (collective:
    the loss lives on the last pipeline stage, the gradients are sharded over TP and PP)."""
    finite = all(bool(torch.isfinite(metrics["loss"][0])) for metrics in reduced)
    finite = finite and all(_all_finite_values(buffer.grad_data)
                            for buffer in run.ddp.buffers + run.ddp.expert_parallel_buffers)
    return not all_reduce_max([not finite])[0]


def _all_finite_values(tensor) -> bool:
    """Whether every value is finite, in one read of `tensor`: its min and max propagate NaN and
    are +-inf when any value is (`isfinite(t).all()` makes three passes and a copy: about 10x the
    time on a 52M-value gradient buffer)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _skip_nonfinite_step(args, run):
    """No optimiser or LR-schedule step (weights and Adam state stay as they were; the gradients
    are zeroed before the next step); stop after --max-nonfinite-steps in a row."""
    run.nonfinite_steps += 1
    iteration = run.iteration + 1
    if run.nonfinite_steps >= args.max_nonfinite_steps:
        raise errors.UserError(f"{run.nonfinite_steps} optimiser steps in a row had a non-finite "
                             f"loss or gradient (the last at iteration {iteration}): lower --lr, "
                             f"check the data, or raise --max-nonfinite-steps")
    print_rank_0(f"warning: iteration {iteration}: non-finite loss or gradient, optimiser step "
                 f"skipped ({run.nonfinite_steps} in a row, --max-nonfinite-steps "
                 f"{args.max_nonfinite_steps})")


def _forward_step(args, run, data_iterator, model):
    mb, record = next(data_iterator)
    teacher = run.teacher if args.mode == "distill" and run.needs.teacher_full else None
    logits = scored_logits(model, mb.tokens, mb.scored, teacher)
    return logits, partial(_loss, args, run, record)


def per_token_loss(args, run, record: TokenRecord, logits):
    """The per-token loss `[N]` of one micro-batch and its metric sums, from the last stage's
    logits: the student's shard predicting each record entry `[N, V/tp]`, or (student, teacher)
    shards when the method needs the teacher's full distribution."""
    if args.mode == "sft":
        per_token = -vp.token_log_probs(logits, record.ids, run.vocab_size)
        return per_token, {"sft_loss": (per_token.detach().sum(),
                                        torch.tensor(float(per_token.numel())))}
    student_logits, teacher_logits = logits if run.needs.teacher_full else (logits, None)
    x = with_student_inputs(record, student_logits, run.vocab_size, run.needs, teacher_logits,
                            jsd_beta=run.config.jsd_beta)
    out = losses.compute_loss(x, run.config)
    return out.per_token, dict(out.metrics)


def _loss(args, run, record: TokenRecord, logits):
    """Token-sum of the per-token loss of one micro-batch, its token count (megatron divides the
    gradients by the global count: token-mean over the global batch) and metric sums."""
    per_token, metrics = per_token_loss(args, run, record, logits)
    n_tokens = (record.counted.sum() if record.counted is not None
                else torch.tensor(len(record), device=per_token.device))
    loss = per_token.sum()
    metrics["loss"] = (loss.detach().float(), n_tokens.float())
    return loss, n_tokens.int(), {k: (torch.as_tensor(s).float(), torch.as_tensor(c).float())
                                  for k, (s, c) in metrics.items()}


def _reduce_over_data_parallel(totals):
    """Sum (sum, count) pairs over the data-parallel group (last pipeline stage holds them)."""
    from megatron.core import parallel_state

    if not totals or not parallel_state.is_pipeline_last_stage():
        return {}
    names = sorted(totals)
    device = comm_device()
    flat = torch.stack([torch.stack([torch.as_tensor(totals[n][0]).float().to(device),
                                     torch.as_tensor(totals[n][1]).float().to(device)])
                        for n in names])
    dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    return {n: (flat[i, 0], flat[i, 1]) for i, n in enumerate(names)}
