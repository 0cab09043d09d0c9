"""What a resumed run keeps from its checkpoint and what its command line changes.

A checkpoint records the flags below (`recorded_flags`). On resume:
- the LR schedule (`SCHEDULE_FLAGS`) is the checkpoint's, as Megatron-LM's
  --use-checkpoint-opt-param-scheduler; --override-opt-param-scheduler takes the command line's;
- --train-iters always comes from the command line, and the LR decay (and weight-decay schedule)
  is re-planned to end there: extending a cosine run continues the cosine to the new end;
- the method and batch flags (`RUN_FLAGS`) are the command line's (changing them is allowed);
  --seed must not change (the data sampler refuses it).
Every recorded flag whose value differs is named in one `warning:` line on rank 0, with the value
the run goes on with.
"""

from megatron_tropd.runtime.initialize import print_rank_0

SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay")
RUN_FLAGS = ("method", "samples_per_prompt", "prompts_per_iteration", "prefix_source",
             "prefix_samples_per_prompt", "seed")
# The scheduler's state keys that follow the schedule flags (the rest, num_steps, is progress).
_SCHEDULER_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_style", "start_wd", "end_wd",
                   "wd_incr_style")
_REPLANNED_KEYS = ("lr_decay_steps", "wd_incr_steps")  # follow --train-iters


def recorded_flags(args) -> dict:
    """The flags a checkpoint records, by name."""
    return {name: getattr(args, name) for name in (*SCHEDULE_FLAGS, "train_iters", *RUN_FLAGS)}


def _flag(name: str) -> str:
    return "--distill-method" if name == "method" else f"--{name.replace('_', '-')}"


def _differences(args, saved: dict, names) -> str:
    """`--flag value (checkpoint: value)` for each flag of `names` that differs, comma-separated."""
    return ", ".join(f"{_flag(name)} {getattr(args, name)} (checkpoint: {saved[name]})"
                     for name in names if name in saved and saved[name] != getattr(args, name))


def resumed_scheduler_state(args, current: dict, saved: dict) -> dict:
    """The LR-scheduler state to load: the checkpoint's (`saved`) or, with
    --override-opt-param-scheduler, the command line's (`current`, what the scheduler was built
    with), at the checkpoint's step count; the decay planned to the current --train-iters."""
    state = dict(saved)
    keys = _SCHEDULER_KEYS if args.override_opt_param_scheduler else ()
    for key in (*keys, *_REPLANNED_KEYS):
        state[key] = current[key]
    return state


def announce_changes(args, saved_flags: dict):
    """One warning line for the schedule flags that differ from the checkpoint's, one for
    --train-iters, one for the method and batch flags (rank 0; nothing when all agree). With
    --no-load-optim the schedule starts afresh from the command line: nothing to say of it."""
    schedule = "" if args.no_load_optim else _differences(args, saved_flags, SCHEDULE_FLAGS)
    if schedule:
        used = ("the command line's values are used (--override-opt-param-scheduler)"
                if args.override_opt_param_scheduler else
                "the checkpoint's values are used (--override-opt-param-scheduler uses the "
                "command line's)")
        print_rank_0(f"warning: resuming with {schedule}: {used}")
    iters = "" if args.no_load_optim else _differences(args, saved_flags, ("train_iters",))
    if iters:
        print_rank_0(f"warning: resuming with {iters}: the LR decay is re-planned to end at "
                     f"iteration {args.train_iters}")
    run = _differences(args, saved_flags, RUN_FLAGS)
    if run:
        print_rank_0(f"warning: resuming with {run}: the run goes on with the command line's")


def set_param_group_lrs(optimizer, state: dict):
    """Give every parameter group the schedule's `max_lr` / `min_lr` (megatron-core's scheduler
    reads them from the groups, and 0.19 pairs saved groups with current ones by them)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in chained.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = state["max_lr"], state["min_lr"]
