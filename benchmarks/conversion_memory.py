"""Peak memory and time of checkpoint conversion for a ~0.5B-parameter model: Qwen2.5-0.5B's shapes
(tied embeddings, 151936-row vocabulary) with random bf16 weights, converted to a float32 Megatron
checkpoint at TP=1/PP=1 and exported back to HF.

Each direction runs as its own process (tools/convert_checkpoint.py), sampled every 50 ms: the
peak resident memory of the tool process, and the peak proportional memory (PSS) summed over it
and the helper processes megatron's checkpoint writer starts. Printed as ratios to one float32
copy of the model, the baseline a streaming converter should stay close to.

    python benchmarks/conversion_memory.py [--workdir /tmp/conversion_memory] [--layers 24]
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time

import psutil
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, REPO)

from megatron_tropd.checkpoint.hf_files import SafetensorsWriter  # noqa: E402
from megatron_tropd.checkpoint.hf_mapping import hf_shapes  # noqa: E402
from megatron_tropd.checkpoint.model_dir import write_json  # noqa: E402
from megatron_tropd.models.arch import ModelArch  # noqa: E402

GIB = 1024**3


def qwen25_05b(layers: int) -> ModelArch:
    return ModelArch(family="qwen2", vocab_size=151936, hidden_size=896, ffn_hidden_size=4864,
                     num_layers=layers, num_attention_heads=14, num_query_groups=2,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     max_position_embeddings=32768)


def write_random_hf_model(directory: str, arch: ModelArch) -> int:
    """A random bf16 HF checkpoint of `arch` (two-shard index, like the real one would be);
    returns the parameter count."""
    os.makedirs(directory)
    writer = SafetensorsWriter(directory, max_shard_bytes=GIB // 2)
    for name, shape in hf_shapes(arch).items():
        writer.add(name, torch.randn(shape, dtype=torch.bfloat16) * 0.02)
    writer.finish()
    config = arch.to_hf_config()
    config["dtype"] = "bfloat16"
    write_json(os.path.join(directory, "config.json"), config)
    return sum(math.prod(shape) for shape in hf_shapes(arch).values())


def measure(args):
    """Run a command; return (seconds, peak RSS of the process, peak PSS of its process tree)."""
    start = time.time()
    proc = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        try:
            peak_rss = max(peak_rss, root.memory_info().rss)
            tree = [root] + root.children(recursive=True)
            peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:  # a helper process ended while it was being read
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr.read()}")
    return time.time() - start, peak_rss, peak_pss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/conversion_memory")
    parser.add_argument("--layers", type=int, default=24, help="24 is Qwen2.5-0.5B")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, mcore_dir, out_dir = (os.path.join(args.workdir, d)
                                  for d in ("hf", "megatron", "export"))
    n_params = write_random_hf_model(hf_dir, qwen25_05b(args.layers))
    model_bytes = 4 * n_params
    print(f"model: {n_params / 1e6:.0f}M parameters, one float32 copy = {model_bytes / GIB:.2f} GiB")

    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    runs = {
        "hf-to-megatron (bf16 HF -> fp32 Megatron, TP=1 PP=1)":
            [sys.executable, tool, "hf-to-megatron", "--hf-dir", hf_dir, "--output-dir", mcore_dir],
        "megatron-to-hf (fp32 Megatron -> fp32 HF, 2 GiB shards)":
            [sys.executable, tool, "megatron-to-hf", "--megatron-dir", mcore_dir,
             "--output-dir", out_dir],
    }
    for name, command in runs.items():
        seconds, rss, pss = measure(command)
        print(f"{name}: {seconds:.0f} s | peak RSS {rss / GIB:.2f} GiB "
              f"({rss / model_bytes:.2f}x model) | peak PSS of process tree {pss / GIB:.2f} GiB "
              f"({pss / model_bytes:.2f}x model)")
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
