"""Where one distillation iteration spends its time, and the model-FLOPs utilisation of the
student update against this machine's matrix-multiply peak, measured in the same run.

    python benchmarks/step_profile.py [--pair toy|large] [--iterations 4] [--method opd] \\
        [--prompts 4] [--samples 4] [--new-tokens 32] [--save-interval 20] [--device cpu|cuda]

The same models, prompts and work per iteration as `benchmarks/vs_trl.py` (whose setup it uses),
run by our trainer (`train.train`) on `--nproc` processes. Phases, per iteration, mean over
ranks, the warm-up iteration dropped:

  rollout          student generation (`batches.rollouts`), its collectives excluded
  teacher          teacher scoring (`distill.teacher.score`), its collectives excluded
  student fwd/bwd  the update's forward and backward passes and losses, collectives excluded
  optimiser        the optimiser step (gradient clipping, Adam), collectives excluded
  communication    every torch.distributed collective, in all phases, and the whole gradient
                   finalisation (data-parallel all-reduce of the gradients, scaling by the
                   global token count); on CPU (gloo) this includes waiting for the other rank
  checkpointing    one save (`checkpointer.save`) divided by `--save-interval`
  other            the rest of the iteration (distillation inputs, metrics, logging)

MFU: forward FLOPs of the student update are 2 x (the layers' matrix-multiply parameters) plus
4 x layers x sequence x attention width (QK^T and AV, unmasked as computed) per token of the
trained sequences, plus 2 x (output-layer parameters) per scored token (the logits the loss needs:
computing them at every position, as megatron's forward does, is not counted as useful work);
forward + backward is 3x that. It is divided by the student fwd/bwd time and by the peak: the best GFLOP/s of a
1024^3 float32 matrix product on every rank at once, each with its own threads, before and after
the run. Ours runs whatever `PYTHONPATH` gives: point it at a checkout of another revision to
profile that one with the same script.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_trl  # noqa: E402  (the shared models, tokenizer, prompts and trainer flags)

PHASES = ("rollout", "teacher", "student fwd/bwd", "optimiser", "communication", "checkpointing",
          "other")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "send", "recv", "isend", "irecv", "barrier", "batch_isend_irecv")


def matmul_peak(device, size=1024, repeats=10):
    """Best GFLOP/s of a `size`^3 float32 matrix product."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def student_forward_flops(model, tokens, scored):
    """Forward FLOPs of `model` (this rank's stage) on `tokens [B, T]` for a loss on the tokens
    `scored [B, T]` marks (see the module doc)."""
    embedding = model.embedding.word_embeddings.weight if model.pre_process else None
    output = None
    if model.post_process:
        output = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else model.output_layer.weight)
    layer_matmul = sum(p.numel() for p in model.parameters()
                       if p.dim() == 2 and p is not embedding and p is not output)
    config = model.config
    layers = len(model.decoder.layers)
    heads = model.decoder.layers[0].self_attention.num_attention_heads_per_partition
    attention_width = heads * config.kv_channels
    rows, length = tokens.shape
    flops = rows * length * (2 * layer_matmul + 4 * layers * length * attention_width)
    if output is not None:  # the output layer where the loss needs logits
        flops += 2 * output.numel() * int(scored.sum())
    return flops


class Profiler:
    """Per-iteration phase times of this rank, gathered by wrapping (for this measurement only)
    the loop's `PhaseTimer`, the collectives, the optimiser and gradient finalisation. Collective
    time is also booked under the innermost phase it ran in, to be taken out of that phase."""

    def __init__(self, device):
        self.device = device
        self.iterations = []  # per iteration: {name: seconds}, plus "start" and "flops"
        self.phases = []  # the phases now running, innermost last

    def _add(self, name, seconds):
        current = self.iterations[-1]
        current[name] = current.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def _timing(self, name, phase=True):
        _sync(self.device)
        start = time.perf_counter()
        if phase:
            self.phases.append(name)
        try:
            yield
            _sync(self.device)
        finally:
            if phase:
                self.phases.pop()
        if self.iterations:
            elapsed = time.perf_counter() - start
            self._add(name, elapsed)
            if not phase and self.phases:
                self._add(f"{name} in {self.phases[-1]}", elapsed)

    def _timer(self, name, fn, phase=True):
        def wrapped(*args, **kwargs):
            with self._timing(name, phase):
                return fn(*args, **kwargs)
        return wrapped

    def install(self):
        import torch.distributed as dist

        from megatron_tropd import run_setup, train

        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._timer("communication", getattr(dist, name), phase=False))
        original_phase, original_setup, original_update = (
            train.PhaseTimer.__call__, run_setup.setup_run, train.update)

        @contextlib.contextmanager
        def phase(timer, name):
            if name == "rollout":
                self.iterations.append({"start": time.perf_counter()})
            with self._timing(name), original_phase(timer, name):
                yield

        def setup_run(args):
            run = original_setup(args)
            student = run.student
            student.optimizer.step = self._timer("optimiser", student.optimizer.step)
            student.model.config.finalize_model_grads_func = self._timer(
                "gradient sync", student.model.config.finalize_model_grads_func)
            return run

        def update(args, run, batch, micro_batches):
            model = run.student.model
            self._add("flops", 3.0 * sum(student_forward_flops(model, mb.tokens, mb.scored)
                                         for mb in micro_batches))
            return original_update(args, run, batch, micro_batches)

        train.PhaseTimer.__call__, run_setup.setup_run, train.update = (
            phase, setup_run, update)

    def shares(self, save_interval):
        """Seconds per phase of every full iteration but the first (warm-up)."""
        out = []
        for it, nxt in zip(self.iterations[1:-1], self.iterations[2:]):
            def exclusive(name):
                return it.get(name, 0.0) - it.get(f"communication in {name}", 0.0)

            sync = it.get("gradient sync", 0.0)
            seconds = {
                "rollout": exclusive("rollout"),
                "teacher": exclusive("teacher"),
                "student fwd/bwd": exclusive("train") - it.get("optimiser", 0.0) - sync,
                "optimiser": exclusive("optimiser"),
                # megatron's DDP all-reduces the gradient buckets in a coalescing context whose
                # wait the collective wrappers do not see: the whole finalisation counts here
                "communication": it.get("communication", 0.0) + sync
                - it.get("communication in checkpoint", 0.0)
                - it.get("communication in gradient sync", 0.0),
                "checkpointing": it.get("checkpoint", 0.0) / save_interval,
            }
            wall = nxt["start"] - it["start"] - it.get("checkpoint", 0.0) + seconds["checkpointing"]
            seconds["other"] = wall - sum(seconds.values())
            seconds["flops"] = it["flops"]
            out.append(seconds)
        return out


def _worker(argv, save_interval, device_type):
    from megatron_tropd import arguments, train

    device = torch.device(device_type)
    profiler = Profiler(device)
    profiler.install()
    import torch.distributed as dist

    # The peak before and after the run, the better of the two: on a shared machine either can
    # fall in a bad moment.
    dist.barrier()
    peak = matmul_peak(device)
    train.train(arguments.parse_args(argv))
    dist.barrier()
    peak = max(peak, matmul_peak(device))
    return {"peak_gflops": peak, "iterations": profiler.shares(save_interval)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    vs_trl.add_work_arguments(parser)
    parser.add_argument("--iterations", type=int, default=4, help="measured (plus one warm-up)")
    parser.add_argument("--method", default="opd", help="--distill-method of the run")
    parser.add_argument("--save-interval", type=int, default=20,
                        help="checkpointing's share is one save divided by this")
    opt = parser.parse_args()
    opt.nproc = opt.nproc or (2 if opt.device == "cpu" else 1)

    from megatron_tropd.runtime.testing import run_distributed

    with tempfile.TemporaryDirectory() as root:
        pair_dirs, vocab = vs_trl.pair(opt.pair, root)
        tokenizer_dir = vs_trl.word_tokenizer(root, vocab)
        # one warm-up, the measured iterations, and one more whose start ends the last of them
        opt.iterations += 2
        prompts_file = vs_trl.write_prompts(root, opt, vocab)
        ckpt = vs_trl.megatron_checkpoints(pair_dirs, root)
        argv = vs_trl.ours_argv(opt, ckpt, tokenizer_dir, prompts_file, vocab,
                                ["--distill-method", opt.method])
        argv += ["--save", os.path.join(root, "run"), "--save-interval", "1", "--keep-last", "1"]
        load = os.getloadavg()[0]
        ranks = run_distributed(_worker, world_size=opt.nproc, tp=opt.tp,
                                args=(argv, opt.save_interval, opt.device))

    rows = [it for r in ranks for it in r["iterations"]]
    seconds = {p: statistics.mean(it[p] for it in rows) for p in PHASES}
    total = sum(seconds.values())
    print(f"pair {opt.pair}, method {opt.method}, {opt.prompts} prompts x {opt.samples} samples "
          f"x {opt.new_tokens} new tokens, {opt.nproc} processes (TP={opt.tp}), device "
          f"{opt.device}, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'phase':18s} {'s/iteration':>12s} {'share':>7s}")
    for p in PHASES:
        print(f"{p:18s} {seconds[p]:12.4f} {seconds[p] / total:7.1%}")
    print(f"{'total':18s} {total:12.4f}")
    peak = sum(r["peak_gflops"] for r in ranks)
    achieved = sum(statistics.mean(it["flops"] / it["student fwd/bwd"] for it in r["iterations"])
                   for r in ranks) / 1e9
    print(f"matmul peak {peak:.1f} GFLOP/s ({opt.nproc} ranks); student update "
          f"{achieved:.1f} GFLOP/s")
    print(f"student_update_mfu={achieved / peak:.3f}")
    print("shares " + json.dumps({p: round(seconds[p] / total, 4) for p in PHASES}))


if __name__ == "__main__":
    main()
