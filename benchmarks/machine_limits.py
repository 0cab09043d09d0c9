"""What this machine allows one training iteration of the `vs_trl.py` pairs: the rates that bound
each phase, measured here, and the floors they put under our iteration (data parallel, 2 CPU
processes of one thread, as `vs_trl.py` runs ours).

    python benchmarks/machine_limits.py [--pair large|toy]

Measured (best of several repeats; one process unless said):
  matmul peak        a 1024^3 float32 product, GFLOP/s of one core
  stream             one read pass over 256 MiB (`sum`), GB/s of one core
  decode products    the student's products of one decode step (every layer's QKV, output
                     projection, fc1, fc2 and the output layer) at 8 rows, weights read from
                     memory: from the `[out, in]` weight (`F.linear`) and through `DecodeLinear`
                     (MKL-packed where torch has MKL), GB/s of weights
  two at once        a loop of 256^3 products and a loop of small operations, in one process
                     alone and in two processes at once (the two data-parallel ranks' situation)
  gloo, 2 processes  all-reduce of 32 floats, all-gather, send/recv round trip (latency); the
                     all-reduce of the student's gradient buffer (fp32), GB/s

Floors per iteration and rank (the work of `vs_trl.py`: 8 rows of 16 prompt + 32 response tokens
per rank): the student update's and the teacher forward's matrix products at the matmul peak
(6 and 2 FLOPs per parameter and token; the output layer at the 32 scored tokens per row only),
the decode steps' weight reads at the stream rate, the fused Adam step's 7 passes over the
student's parameters at the stream rate, and the gradient all-reduce as measured. Their sum is
what no implementation of our iteration on this machine can beat; `vs_trl.py` says what TRL takes.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_profile import matmul_peak  # noqa: E402
from vs_trl import LARGE, LARGE_VOCAB, TOY  # noqa: E402

from megatron_tropd.runtime.cpu_speedups import DecodeLinear  # noqa: E402

ROWS, PROMPT, RESPONSE = 8, 16, 32  # per rank


def toy_shapes():
    """The shapes of the `examples/toy` pair, from its HF configs, in `LARGE`'s keys, and its
    vocabulary with the benchmark's end-of-sequence row."""
    shapes = {}
    for role in ("student", "teacher"):
        with open(os.path.join(TOY, role, "config.json")) as f:
            config = json.load(f)
        shapes[role] = {key: config[key] for key in LARGE[role]}
    return shapes, config["vocab_size"] + 1


def best_seconds(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def product_shapes(shape, vocab):
    """`(in, out)` of every matrix product of one token through the model, the output layer last."""
    h, d = shape["hidden_size"], shape["head_dim"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    layer = [(h, qkv), (shape["num_attention_heads"] * d, h), (h, 2 * shape["intermediate_size"]),
             (shape["intermediate_size"], h)]
    return layer * shape["num_hidden_layers"] + [(h, vocab)]


def matmul_flops(shape, vocab, per_parameter):
    """FLOPs of the products of one rank's rows: every layer at every token, the output layer at
    the scored (response) tokens only."""
    shapes = product_shapes(shape, vocab)
    layers = sum(i * o for i, o in shapes[:-1])
    out = shapes[-1][0] * shapes[-1][1]
    return per_parameter * (layers * ROWS * (PROMPT + RESPONSE) + out * ROWS * RESPONSE)


def stream_gbs():
    x = torch.ones(64 * 2**20)  # 256 MiB
    return x.numel() * 4 / best_seconds(x.sum) / 1e9


def decode_products(shape, vocab):
    """GB/s of weights read by one decode step's products, plain and through `DecodeLinear`."""
    weights = [torch.randn(o, i) for i, o in product_shapes(shape, vocab)]
    inputs = {i: torch.randn(ROWS, i) for i in {w.shape[1] for w in weights}}
    packed = [DecodeLinear(w, ROWS) for w in weights]
    size = sum(w.numel() for w in weights) * 4
    with torch.inference_mode():
        plain = best_seconds(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights])
        decode = best_seconds(lambda: [p(inputs[p.weight.shape[1]]) for p in packed])
    return size / plain / 1e9, size / decode / 1e9, size


def loops():
    """Seconds of a loop of 256^3 products (compute) and of a loop of small operations on `[8, 64]`
    tensors (per-operation dispatch, what the toy pair's phases are made of)."""
    a, x, w = torch.randn(256, 256), torch.randn(8, 64), torch.randn(64, 64)
    return {"product loop": best_seconds(lambda: [a @ a for _ in range(2000)], repeats=3),
            "small-op loop": best_seconds(lambda: [F.silu(x @ w + x) for _ in range(20000)],
                                          repeats=3)}


def _two_processes(rank, port, gradient_numel, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    small = torch.zeros(32)
    gathered = [torch.zeros(32), torch.zeros(32)]

    def ping_pong():
        if rank == 0:
            dist.send(small, 1)
            dist.recv(small, 1)
        else:
            dist.recv(small, 0)
            dist.send(small, 0)

    def per_call(fn, calls=300):
        for _ in range(20):
            fn()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    results = {
        "all-reduce, 32 floats": per_call(lambda: dist.all_reduce(small)),
        "all-gather, 32 floats": per_call(lambda: dist.all_gather(gathered, small)),
        "send/recv round trip": per_call(ping_pong),
    }
    gradients = torch.ones(gradient_numel)
    dist.barrier()
    results["gradient all-reduce"] = best_seconds(lambda: dist.all_reduce(gradients), repeats=3)
    dist.barrier()
    dist.barrier()
    both = loops()
    results.update({f"{name}, rank {rank}": seconds for name, seconds in both.items()})
    dist.barrier()
    out.update({k: v for k, v in results.items() if rank == 0 or "rank" in k})
    dist.destroy_process_group()


def two_processes(gradient_numel):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_processes, args=(29650 + os.getpid() % 200, gradient_numel, out), nprocs=2)
        return dict(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=("large", "toy"), default="large")
    opt = parser.parse_args()
    torch.set_num_threads(1)
    shapes, vocab = (LARGE, LARGE_VOCAB + 1) if opt.pair == "large" else toy_shapes()
    student, teacher = shapes["student"], shapes["teacher"]
    student_params = (sum(i * o for i, o in product_shapes(student, vocab))
                      + vocab * student["hidden_size"]  # the embedding
                      + (2 * student["num_hidden_layers"] + 1) * student["hidden_size"])  # norms

    peak = matmul_peak(torch.device("cpu")) * 1e9
    stream = stream_gbs() * 1e9
    plain, decode, step_bytes = decode_products(student, vocab)
    alone = loops()
    comm = two_processes(student_params)
    # before and after: the better moment of the machine
    alone = {name: min(seconds, loops()[name]) for name, seconds in alone.items()}

    print(f"pair {opt.pair}; one thread per process; load average {os.getloadavg()[0]:.1f}")
    print(f"matmul peak            {peak / 1e9:8.1f} GFLOP/s")
    print(f"stream                 {stream / 1e9:8.1f} GB/s")
    print(f"decode products        {plain:8.1f} GB/s plain, {decode:.1f} GB/s DecodeLinear "
          f"({step_bytes / 2**20:.2f} MiB of weights per step)")
    for name, seconds in alone.items():
        print(f"{name:22s} {seconds:8.3f} s alone; two processes at once: "
              f"{comm[f'{name}, rank 0']:.3f} and {comm[f'{name}, rank 1']:.3f} s")
    for name in ("all-reduce, 32 floats", "all-gather, 32 floats", "send/recv round trip"):
        print(f"gloo {name:22s} {comm[name] * 1e6:8.0f} us")
    grad_seconds = comm["gradient all-reduce"]
    print(f"gloo gradient all-reduce {grad_seconds:6.3f} s ({student_params * 4 / 2**20:.0f} MiB, "
          f"{student_params * 4 / grad_seconds / 1e9:.2f} GB/s)")

    steps = RESPONSE + 1  # the prefill and one step per new token
    floors = {
        "student update (products at peak)": matmul_flops(student, vocab, 6) / peak,
        "teacher forward (products at peak)": matmul_flops(teacher, vocab, 2) / peak,
        "decode (weights at stream rate)": steps * step_bytes / stream,
        "Adam step (7 passes at stream rate)": 7 * student_params * 4 / stream,
        "gradient all-reduce (measured)": grad_seconds,
    }
    print("floors per iteration and rank:")
    for name, seconds in floors.items():
        print(f"  {name:38s} {seconds:8.4f} s")
    print(f"iteration_floor_s={sum(floors.values()):.4f}")


if __name__ == "__main__":
    main()
