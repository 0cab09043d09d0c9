"""The training loop: student rollouts -> teacher scoring -> student update (and SFT through the
same update), with metrics and checkpoints. Read `train()` top-down.

    torchrun --nproc-per-node 8 -m megatron_tropd.train --tensor-model-parallel-size 2 \\
        --student-load ckpt/student --teacher-load ckpt/teacher --prompts prompts.jsonl \\
        --distill-method tropd --train-iters 200 --save runs/tropd
    multi-node: torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...

One iteration on every data-parallel rank (distillation; `batches.py` makes the batch):
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
from megatron_tropd.models.forward import scored_logits
from megatron_tropd.monitor import MetricsLogger
from megatron_tropd.runtime import faults
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.runtime.initialize import (all_reduce_max, comm_device, initialize_distributed,
                                               print_rank_0)
from megatron_tropd.runtime.stopping import StopConditions
from megatron_tropd.tokens import TokenRecord


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
    state = run.state
    logger = MetricsLogger(args, state.iteration)
    print_rank_0(f"training {args.mode}"
                 f"{'' if args.mode == 'sft' else ' ' + args.method} for {args.train_iters} "
                 f"iterations from iteration {state.iteration} (DP={dp}, "
                 f"TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size})")
    if args.eval_interval and state.iteration == 0:
        logger.log_eval(state.iteration, heldout_pass_rate(args, run))
    with stop:  # from here on SIGTERM / SIGUSR1 finish the iteration and save
        while state.iteration < args.train_iters:
            timer = PhaseTimer()
            batch, micro_batches, batch_metrics = run.batches.next(state.iteration, timer)
            with timer("train"):
                totals, grad_norm = update(args, run, batch, micro_batches)
            state.iteration += 1
            sums = _reduce_over_data_parallel({**batch_metrics, **totals})  # one all-reduce
            sums["grad_norm"] = (torch.tensor(grad_norm), torch.tensor(1.0))
            logger.log(state.iteration, sums, timer, state.scheduler)
            if args.eval_interval and state.iteration % args.eval_interval == 0:
                logger.log_eval(state.iteration, heldout_pass_rate(args, run))
            reason = stop.reason(state.iteration)  # collective: every rank stops at one iteration
            if checkpointer.due(args, state.iteration) or (reason and args.save):
                with timer("checkpoint"):  # after the log line: benchmarks/step_profile reads it
                    checkpointer.save(args, run.student, state)
            if reason and state.iteration < args.train_iters:
                print_rank_0(f"stopped at iteration {state.iteration} of {args.train_iters} "
                             f"({reason}): " + ("the same command resumes from the checkpoint"
                                                if args.save else "nothing saved (no --save)"))
                break
    logger.close()
    print_rank_0(f"done: {state.iteration} iterations")
    run.history, run.eval_history = logger.history, logger.eval_history
    return run


def heldout_pass_rate(args, run) -> dict:
    """The student's greedy pass@1 (and outcome counts, lengths) on --eval-data, the prompts
    split over data-parallel replicas (collective)."""
    from megatron.core import parallel_state

    from megatron_tropd.evaluate import evaluate

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    heldout = run.heldout
    return evaluate(run.student.model, heldout.tokenizer, heldout.examples[rank::dp],
                    run.student.arch.vocab_size, args.max_new_tokens,
                    batch_size=args.rollout_batch_size, seed=args.seed, verifier=heldout.verifier)


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


# --- the student update -------------------------------------------------------------------------


@cuda_to_cpu()
def update(args, run, batch, micro_batches):
    """`epochs_per_rollout` optimiser steps on `batch`; returns this rank's metric sums over the
    micro-batches (the caller reduces them over data-parallel ranks with the batch's metrics, in
    one all-reduce) and the last step's gradient norm."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    student, state = run.student, run.state
    totals = {}
    for _ in range(args.epochs_per_rollout):
        student.ddp.zero_grad_buffer()
        student.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, run.batches),
            data_iterator=((mb, batch.record.select(mb.index)) for mb in micro_batches),
            model=[student.ddp], num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=False,
        )
        if _all_finite(student, reduced):
            _, grad_norm, _ = student.optimizer.step()
            faults.point("optimizer", state.iteration + 1)
            state.scheduler.step(increment=1)
            state.nonfinite_steps = 0
        else:
            grad_norm = float("nan")
            _skip_nonfinite_step(args, state)
        for metrics in reduced:
            for name, (total, count) in metrics.items():
                t, c = totals.get(name, (0.0, 0.0))
                totals[name] = (t + total, c + count)
    return totals, float(grad_norm or 0.0)


def _all_finite(student, reduced) -> bool:
    """Whether every micro-batch loss and every gradient is finite, on every rank (collective:
    the loss lives on the last pipeline stage, the gradients are sharded over TP and PP)."""
    finite = all(bool(torch.isfinite(metrics["loss"][0])) for metrics in reduced)
    finite = finite and all(_all_finite_values(buffer.grad_data)
                            for buffer in student.ddp.buffers + student.ddp.expert_parallel_buffers)
    return not all_reduce_max([not finite])[0]


def _all_finite_values(tensor) -> bool:
    """Whether every value is finite, in one read of `tensor`: its min and max propagate NaN and
    are +-inf when any value is (`isfinite(t).all()` makes three passes and a copy: about 10x the
    time on a 52M-value gradient buffer)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _skip_nonfinite_step(args, state):
    """No optimiser or LR-schedule step (weights and Adam state stay as they were; the gradients
    are zeroed before the next step); stop after --max-nonfinite-steps in a row."""
    state.nonfinite_steps += 1
    iteration = state.iteration + 1
    if state.nonfinite_steps >= args.max_nonfinite_steps:
        raise errors.UserError(f"{state.nonfinite_steps} optimiser steps in a row had a non-finite "
                             f"loss or gradient (the last at iteration {iteration}): lower --lr, "
                             f"check the data, or raise --max-nonfinite-steps")
    print_rank_0(f"warning: iteration {iteration}: non-finite loss or gradient, optimiser step "
                 f"skipped ({state.nonfinite_steps} in a row, --max-nonfinite-steps "
                 f"{args.max_nonfinite_steps})")


def _forward_step(batches, data_iterator, model):
    mb, record = next(data_iterator)
    logits = scored_logits(model, mb.tokens, mb.scored, batches.paired_teacher)
    return logits, partial(_loss, batches, record)


def _loss(batches, record: TokenRecord, logits):
    """Token-sum of the per-token loss of one micro-batch, its token count (megatron divides the
    gradients by the global count: token-mean over the global batch) and metric sums."""
    per_token, metrics = batches.per_token_loss(record, logits)
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


if __name__ == "__main__":
    main()
