"""Peak memory and time of a distillation loss's forward + backward: (a) the naive way on gathered
full-vocabulary logits, one process, vs (b) the vocabulary-parallel primitives at TP=2, per rank.

    python benchmarks/loss_memory.py [--batch 4 --seq 512 --vocab 32000]

Loss = reverse KL + forward KL - token log-prob (token-mean), student logits with gradient, teacher
logits without. Memory is the process's peak resident set (VmHWM, reset just before the inputs are
made) minus its resident set before them, with glibc returning large blocks to the OS at once
(MALLOC_MMAP_THRESHOLD_), so it counts the inputs and everything the loss allocates. Both variants
run in spawned processes of the same kind. Last line: `peak_ratio_tp2_vs_gathered=<(b)/(a)>`.
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_tropd.runtime.testing import run_distributed  # noqa: E402

MiB = 2**20


def _status_mib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024 / MiB


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _naive_loss(student, teacher, targets):
    lps, lpt = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    reverse_kl = (lps.exp() * (lps - lpt)).sum(-1)
    forward_kl = (lpt.exp() * (lpt - lps)).sum(-1)
    token_lp = lps.gather(-1, targets[..., None])[..., 0]
    return (reverse_kl + forward_kl - token_lp).mean()


def _parallel_loss(student, teacher, targets, vocab):
    from megatron_tropd.ops import vocab_parallel as vp

    reverse_kl = vp.kl_divergence(student, teacher, vocab)
    forward_kl = vp.kl_divergence(teacher, student, vocab)
    token_lp = vp.token_log_probs(student, targets, vocab)
    return (reverse_kl + forward_kl - token_lp).mean()


N_SHARDS = 2  # the global logits are made as N_SHARDS seeded blocks, whoever holds them


def _logits_block(batch, seq, width, seed):
    return torch.empty(batch, seq, width).normal_(generator=torch.Generator().manual_seed(seed))


def measure(batch, seq, vocab, parallel):
    """Runs in a spawned process: (peak MiB, TP=2 shard MiB, seconds, loss)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = vocab // tp
    blocks = range(N_SHARDS) if tp == 1 else [rank]
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    # warm-up on small inputs so one-time allocations (kernels, gloo buffers) are not counted
    small = (torch.randn(2, 8, local), torch.randn(2, 8, local), targets[:2, :8] % local)
    for _ in range(2):
        s = small[0].clone().requires_grad_(True)
        (_parallel_loss(s, small[1], small[2], local * tp) if parallel else
         _naive_loss(s, small[1], small[2])).backward()
    base = _status_mib("VmRSS")
    _reset_peak()
    # The same global logits in both variants; a TP rank makes only its own shard.
    width = vocab // N_SHARDS
    student = torch.cat([_logits_block(batch, seq, width, b) for b in blocks], -1)
    teacher = torch.cat([_logits_block(batch, seq, width, 100 + b) for b in blocks], -1)
    student.requires_grad_(True)
    start = time.perf_counter()
    loss = _parallel_loss(student, teacher, targets, vocab) if parallel else \
        _naive_loss(student, teacher, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM") - base
    return peak, batch * seq * (vocab // 2) * 4 / MiB, seconds, loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000, help="must be divisible by 2")
    args = p.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited by the spawned processes
    shape = (args.batch, args.seq, args.vocab)
    naive = run_distributed(measure, world_size=1, args=shape + (False,))[0]
    tp2 = run_distributed(measure, world_size=2, tp=2, args=shape + (True,))
    peak_tp2 = max(r[0] for r in tp2)
    shard = tp2[0][1]
    print(f"batch {args.batch}, seq {args.seq}, vocab {args.vocab}, fp32; loss = reverse KL + "
          f"forward KL - token log-prob; student and teacher logits are the inputs")
    print(f"{'variant':<28}{'peak MiB/rank':>15}{'x logits shard':>16}{'time s':>9}{'loss':>10}")
    print(f"{'(a) gathered, 1 process':<28}{naive[0]:>15.0f}{naive[0] / shard:>16.2f}"
          f"{naive[2]:>9.2f}{naive[3]:>10.4f}")
    for rank, r in enumerate(tp2):
        print(f"{f'(b) TP=2 rank {rank}':<28}{r[0]:>15.0f}{r[0] / shard:>16.2f}{r[2]:>9.2f}"
              f"{r[3]:>10.4f}")
    print(f"local logits shard at TP=2: {shard:.0f} MiB; inputs per rank (student + teacher "
          f"shards): {2 * shard:.0f} MiB; loss working memory per rank (peak - inputs): "
          f"{peak_tp2 - 2 * shard:.0f} MiB = {(peak_tp2 - 2 * shard) / shard:.2f} x shard")
    print(f"peak_ratio_tp2_vs_gathered={peak_tp2 / naive[0]:.3f}")


if __name__ == "__main__":
    main()
