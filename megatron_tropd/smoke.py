"""End-to-end smoke run of the foundation: a student and a frozen teacher on the same TP/PP groups,
the student trained to lower its full-vocabulary reverse KL to the teacher, logits kept sharded.

    torchrun --nproc-per-node 2 -m megatron_tropd.smoke --tensor-model-parallel-size 2

Random token sequences stand in for rollouts; the teacher is randomly initialised. It exercises the
model builder, megatron DDP + optimiser + `finalize_model_grads`, and the vocabulary-parallel
KL / entropy / sampling primitives, and prints the losses as it goes.
"""

import argparse
import sys
import time

import torch

from megatron_tropd.initialize import ParallelConfigError, initialize_distributed, print_rank_0
from megatron_tropd.models.arch import ArchitectureError, ModelArch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student-config", default="examples/configs/tiny_student.json",
                   help="model config of the student (HF config.json or our own JSON)")
    p.add_argument("--teacher-config", default="examples/configs/tiny_teacher.json",
                   help="model config of the teacher")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        student_arch = ModelArch.from_file(args.student_config)
        teacher_arch = ModelArch.from_file(args.teacher_config)
        initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                               args.seed)
        if args.pipeline_model_parallel_size != 1:
            raise ParallelConfigError("the smoke run supports pipeline-model-parallel size 1 only")
        from megatron_tropd.models.builder import build_student_and_teacher

        student, teacher = build_student_and_teacher(student_arch, teacher_arch)
    except (ArchitectureError, ParallelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run(args, student, teacher, student_arch.vocab_size)


def run(args, student, teacher, vocab_size):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tropd.ops import vocab_parallel as vp

    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(), student)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0), [ddp])
    print_rank_0(f"student {sum(p.numel() for p in student.parameters())} and teacher "
                 f"{sum(p.numel() for p in teacher.parameters())} parameters per rank; "
                 f"TP={ps.get_tensor_model_parallel_world_size()} "
                 f"DP={ps.get_data_parallel_world_size()}")
    # Every DP rank draws its own batch; TP ranks of one replica must see the same tokens.
    g = torch.Generator().manual_seed(args.seed + ps.get_data_parallel_rank())
    positions = torch.arange(args.seq_length).expand(args.batch_size, -1)
    first = last = None
    start = time.time()
    for it in range(1, args.iterations + 1):
        tokens = torch.randint(0, vocab_size, (args.batch_size, args.seq_length), generator=g)
        with torch.no_grad():
            teacher_logits = teacher(tokens, positions, None)
        student_logits = ddp(tokens, positions, None)
        reverse_kl = vp.kl_divergence(student_logits, teacher_logits, vocab_size).mean()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reverse_kl.backward()
        finalize_model_grads([ddp])
        _, grad_norm, _ = optimizer.step()
        first = first if first is not None else reverse_kl.item()
        last = reverse_kl.item()
        if it == 1 or it % 5 == 0:
            with torch.no_grad():
                forward_kl = vp.kl_divergence(teacher_logits, student_logits, vocab_size).mean()
                h_s = vp.entropy(student_logits, vocab_size).mean()
                h_t = vp.entropy(teacher_logits, vocab_size).mean()
            print_rank_0(f"iteration {it:3d}/{args.iterations} | reverse KL {last:.4f} | forward KL "
                         f"{forward_kl.item():.4f} | entropy student {h_s.item():.3f} teacher "
                         f"{h_t.item():.3f} | grad norm {grad_norm:.3f} | "
                         f"{(time.time() - start) / it:.2f} s/it")
    keys = vp.sampling_keys(args.seed, torch.arange(args.batch_size), args.seq_length)
    sampled = vp.sample(student_logits[:, -1].detach(), vocab_size, keys, temperature=1.0, top_p=0.9)
    print_rank_0(f"next tokens sampled from the student (top-p 0.9): {sampled.tolist()}")
    print_rank_0(f"smoke: reverse_kl first={first:.4f} last={last:.4f}")


if __name__ == "__main__":
    main()
