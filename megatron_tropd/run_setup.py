"""A training run built from the arguments: the student (megatron DDP, optimiser), the run's state
(LR schedule, data sampler, iteration), the batch source of its mode (the frozen teacher, the
tokenizer, the data) and the held-out prompts; resumed from --load / --save when a checkpoint is
there (`checkpointer.resume`)."""

import dataclasses
from typing import Callable, Optional

import torch

from megatron_tropd import arguments
from megatron_tropd.batches import DistillationBatches, SftBatches
from megatron_tropd.models.arch import ModelArch
from megatron_tropd.models.builder import build_model, check_student_teacher
from megatron_tropd.runtime import cpu_speedups
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu


@dataclasses.dataclass
class Student:
    """The model being trained: this rank's stage, megatron DDP around it, its optimiser."""

    model: torch.nn.Module              # the stage (unwrapped)
    ddp: torch.nn.Module
    optimizer: object
    arch: ModelArch
    source: Optional[str]               # checkpoint it came from (config, tokenizer files)


@dataclasses.dataclass
class TrainState:
    """What a resume restores besides the weights and the optimiser: where the run is."""

    scheduler: object                   # megatron's OptimizerParamScheduler
    sampler: object                     # data.PromptSampler: the data position
    iteration: int = 0
    nonfinite_steps: int = 0            # steps skipped in a row (non-finite); not saved: a resume
                                        # starts the count again

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict):
        self.iteration = state["iteration"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])


@dataclasses.dataclass
class HeldOut:
    """--eval-data: held-out prompts with answers, scored by --verifier during training."""

    examples: list
    tokenizer: object
    verifier: Optional[Callable[[str, str], str]]


@dataclasses.dataclass
class Run:
    """A training run on this rank: built by `setup_run`, resumed, then trained by `train.train`
    (which fills in the histories)."""

    student: Student
    state: TrainState
    batches: object                     # batches.DistillationBatches or batches.SftBatches
    heldout: Optional[HeldOut] = None
    history: list = dataclasses.field(default_factory=list)
    eval_history: list = dataclasses.field(default_factory=list)


def setup_run(args) -> Run:
    from megatron.core import parallel_state

    from megatron_tropd.checkpoint import checkpointer
    from megatron_tropd.data import PromptSampler

    distill = args.mode == "distill"
    student_arch = _arch(args.student_load, args.student_config)
    tokenizer = _tokenizer(args, student_arch)
    if distill and args.teacher_topk > student_arch.vocab_size:
        raise arguments.ArgumentError(f"--teacher-topk {args.teacher_topk} exceeds the vocabulary "
                                      f"of {student_arch.vocab_size} ids")
    if distill:
        teacher_arch = _arch(args.teacher_load, args.teacher_config)
        check_student_teacher(student_arch, teacher_arch)
    examples = _data(args, tokenizer)  # a bad file is reported before the models are built
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    common = dict(params_dtype=dtype, use_transformer_engine=args.transformer_engine)
    model = build_model(student_arch, "student", calculate_per_token_loss=True, **common)
    if args.student_load:
        checkpointer.load_weights(args.student_load, model)
    teacher = None
    if distill:
        teacher = build_model(teacher_arch, "teacher", **common)
        if args.teacher_load:
            checkpointer.load_weights(args.teacher_load, teacher)
    ddp, optimizer, scheduler = _optimizer(args, model)
    student = Student(model=model, ddp=ddp, optimizer=optimizer, arch=student_arch,
                      source=args.student_load)

    dp_rank = parallel_state.get_data_parallel_rank()
    sampler = PromptSampler(len(examples), args.prompts_per_iteration, dp_rank,
                            parallel_state.get_data_parallel_world_size(), args.seed)
    state = TrainState(scheduler=scheduler, sampler=sampler)
    verifier = _verifier(args, examples) if args.verifier else None
    vocab_size = student_arch.vocab_size
    if distill:
        batch_source = DistillationBatches(
            args=args, student=model, teacher=teacher, config=arguments.distill_config(args),
            sampler=sampler, prompts=examples, vocab_size=vocab_size, pad_id=tokenizer.pad_id,
            stop_ids=tuple(sorted({tokenizer.eos_id, *(args.stop_ids or [])})), dp_rank=dp_rank,
            tokenizer=tokenizer, verifier=verifier)
        if args.prefix_source != "none":
            batch_source.teacher_responses = _teacher_responses(args, batch_source)
    else:
        batch_source = SftBatches(args=args, student=model, sampler=sampler, examples=examples,
                                  vocab_size=vocab_size, pad_id=tokenizer.pad_id)
    heldout = (HeldOut(_eval_examples(args, tokenizer), tokenizer, verifier) if args.eval_data
               else None)
    checkpointer.resume(args, student, state)
    return Run(student=student, state=state, batches=batch_source, heldout=heldout)


def _arch(load_dir, config_path) -> ModelArch:
    return ModelArch.from_file(load_dir or config_path)


def _tokenizer(args, student_arch: ModelArch):
    """The student's tokenizer, checked against the student's vocabulary and, when the teacher
    checkpoint carries tokenizer files, against the teacher's tokenizer."""
    from megatron_tropd.tokenizer import (TokenizerError, check_same_tokens, has_tokenizer,
                                          load_chat_template, load_tokenizer)

    path = args.tokenizer or args.student_load
    if path is None:
        raise TokenizerError("no tokenizer: give --tokenizer (the student was built from a config)")
    tokenizer = load_tokenizer(path)
    if args.chat_template_file:
        load_chat_template(tokenizer, args.chat_template_file)
    if tokenizer.vocab_size > student_arch.vocab_size:
        raise TokenizerError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids, more "
                             f"than the student's vocabulary of {student_arch.vocab_size}")
    if args.mode == "distill" and args.teacher_load and has_tokenizer(args.teacher_load):
        check_same_tokens(tokenizer, load_tokenizer(args.teacher_load))
    return tokenizer


def _data(args, tokenizer):
    from megatron_tropd import data
    from megatron_tropd.runtime.initialize import print_rank_0

    columns = data.columns_from_args(args)
    if args.mode == "sft":
        path = args.sft_data
        examples = data.load_sft(path, tokenizer, args.prompt_template,
                                 args.max_prompt_length + args.max_new_tokens, columns)
    else:
        path = args.prompts
        examples = data.load_prompts(path, tokenizer, args.prompt_template, args.max_prompt_length,
                                     columns)
    if len(examples) < args.prompts_per_iteration:
        kind = "examples" if args.mode == "sft" else "prompts"
        print_rank_0(f"warning: {path} has {len(examples)} {kind}, fewer than "
                     f"--prompts-per-iteration {args.prompts_per_iteration}: {kind} repeat within "
                     f"an iteration")
    return examples


def _verifier(args, examples):
    """--verifier's function; a warning when no training prompt carries an answer (no pass rate
    of the rollouts is logged then)."""
    from megatron_tropd.runtime.initialize import print_rank_0
    from megatron_tropd.tasks.verifiers import get_verifier

    if args.mode == "distill" and all(e.answer is None for e in examples):
        print_rank_0(f"warning: --verifier {args.verifier}: no prompt in {args.prompts} has an "
                     f"'{args.answer_key}', so no pass rate of the rollouts is logged")
    return get_verifier(args.verifier)


def _eval_examples(args, tokenizer):
    from megatron_tropd import data

    examples = data.load_prompts(args.eval_data, tokenizer, args.prompt_template,
                                 args.max_prompt_length, data.columns_from_args(args))
    examples = examples[:args.eval_limit] if args.eval_limit else examples
    missing = next((e.index for e in examples if e.answer is None), None)
    if missing is not None:
        raise data.DataError(f"{args.eval_data}: problem {missing} has no '{args.answer_key}' "
                             f"to verify against")
    return examples


@cuda_to_cpu()
def _optimizer(args, model):
    """Megatron DDP, Adam(W) (megatron's, falling back to torch's without apex/TE) with gradient
    clipping, and the LR schedule (warm-up, then constant / linear / cosine decay to --min-lr)."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    # token-mean over the global batch: the schedule sums per-token losses and finalize divides the
    # gradients by the token count all-reduced over data-parallel ranks and micro-batches
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
            bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [ddp],
    )
    cpu_speedups.fuse_cpu_adam(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * args.epochs_per_rollout,
        lr_decay_steps=args.train_iters * args.epochs_per_rollout,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.epochs_per_rollout, wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def _teacher_responses(args, source):
    """--prefix-source's provider of teacher responses: the offline file's, or the teacher's own
    samples (seed + 1: not the student's draws). Its global prompt index counts every prompt
    drawn since the start (the sampler's consumed samples)."""
    from megatron_tropd.rollout import teacher_responses as tr
    from megatron_tropd.rollout.generate import SamplingParams

    if args.prefix_source == "offline":
        from megatron_tropd.data import load_teacher_responses

        return tr.OfflineTeacherResponses(load_teacher_responses(args.teacher_responses,
                                                                 source.vocab_size))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_ids=source.stop_ids,
                            seed=args.seed + 1)
    return tr.OnlineTeacherResponses(source.teacher, params, source.vocab_size,
                                     rollout_batch_size=args.rollout_batch_size,
                                     max_prefill_tokens=args.max_tokens_per_micro_batch)
