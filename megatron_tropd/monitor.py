"""Training metrics: one console line per log interval (Megatron-LM style, with an ETA) and every
metric to TensorBoard each iteration, written by the last rank (a last-pipeline-stage rank, where
the loss and its metrics live)."""

import datetime
import time

import torch.distributed as dist

# Console names of the metrics worth a glance; everything goes to TensorBoard.
_CONSOLE = (("loss", "loss"), ("k1_reverse_kl", "k1"), ("trusted_fraction", "trusted"),
            ("response_length", "resp len"), ("pass_rate", "pass"), ("prefix_alpha", "alpha"),
            ("sft_loss", "ce"))


class MetricsLogger:
    def __init__(self, args, start_iteration: int):
        self.args = args
        self.is_writer = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.start_iteration = start_iteration
        self.start_time = time.perf_counter()
        self.last_time = self.start_time
        # per iteration: {name: mean}, throughputs and `<phase>_s` seconds (`iteration_s`: the
        # wall time since the previous iteration was logged), for tests, tools and benchmarks
        self.history = []
        self.eval_history = []  # per held-out evaluation: {"iteration", **evaluate's figures}
        self.writer = None
        log_dir = args.tensorboard_dir or (f"{args.save}/tensorboard" if args.save else None)
        if self.is_writer and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir, purge_step=start_iteration + 1)

    def log(self, iteration: int, sums: dict, timings: dict, scheduler):
        """`sums`: name -> (sum, count) over the global batch; `timings`: phase -> seconds."""
        now = time.perf_counter()
        timings = {**timings, "iteration": now - self.last_time}
        self.last_time = now
        if not self.is_writer:
            return
        means = {name: float(s) / float(c) for name, (s, c) in sums.items() if float(c) > 0}
        means["lr"] = scheduler.optimizer.param_groups[0]["lr"]
        throughput = self._throughput(sums, timings)
        self.history.append({**means, **throughput,
                             **{f"{phase}_s": seconds for phase, seconds in timings.items()}})
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, iteration)
            for phase, seconds in timings.items():
                self.writer.add_scalar(f"time/{phase}_s", seconds, iteration)
            for name, value in throughput.items():
                self.writer.add_scalar(f"throughput/{name}", value, iteration)
            self.writer.flush()
        if iteration % self.args.log_interval == 0 or iteration == self.args.train_iters:
            print(self._line(iteration, means, throughput), flush=True)

    def log_eval(self, iteration: int, result: dict):
        """A held-out evaluation (`evaluate.summarize`'s figures): TensorBoard eval/ and one
        console line."""
        self.eval_history.append({"iteration": iteration, **result})
        if not self.is_writer:
            return
        figures = {name: result[name] for name in ("pass@1", "mean_length", "truncated")}
        if self.writer is not None:
            for name, value in figures.items():
                self.writer.add_scalar(f"eval/{name}", value, iteration)
            self.writer.flush()
        counts = result["greedy"]
        print(f"eval at iteration {iteration}: pass@1 {result['pass@1']:.4f} of "
              f"{result['problems']} ({counts['correct']} correct, {counts['wrong']} wrong, "
              f"{counts['malformed']} malformed)", flush=True)

    @staticmethod
    def _throughput(sums, timings):
        """Tokens per second per phase: generated tokens for the rollout, scored tokens for the
        teacher, trained tokens (all epochs) for the update."""
        out = {}
        if "response_length" in sums and timings.get("rollout"):
            out["rollout_tokens_per_s"] = float(sums["response_length"][0]) / timings["rollout"]
        if "loss" in sums:
            trained = float(sums["loss"][1])
            if timings.get("teacher"):
                out["teacher_tokens_per_s"] = trained / timings["teacher"]
            if timings.get("train"):
                out["train_tokens_per_s"] = trained / timings["train"]
        return out

    def _line(self, iteration, means, throughput):
        done = iteration - self.start_iteration
        elapsed = time.perf_counter() - self.start_time
        per_iteration = elapsed / max(done, 1)
        eta = datetime.timedelta(seconds=round(per_iteration * (self.args.train_iters - iteration)))
        parts = [f"iteration {iteration:5d}/{self.args.train_iters}", f"lr {means['lr']:.3e}"]
        parts += [f"{label} {means[name]:.4f}" for name, label in _CONSOLE if name in means]
        if "grad_norm" in means:
            parts.append(f"grad norm {means['grad_norm']:.3f}")
        parts += [f"{name.split('_')[0]} {value:.0f} tok/s" for name, value in throughput.items()]
        parts += [f"{per_iteration:.2f} s/it", f"ETA {eta}"]
        return " | ".join(parts)

    def close(self):
        if self.writer is not None:
            self.writer.close()
