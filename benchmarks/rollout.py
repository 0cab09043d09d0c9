"""Decode throughput of rollout generation: KV cache vs full recompute, and vs HF transformers
`generate` on the same weights (greedy), measured interleaved in one run.

    python benchmarks/rollout.py [--repeats 3] [--new-tokens 256] [--threads N]

Model: Llama family, 4 layers, hidden 256, 8 heads (4 key/value heads), vocabulary 32000, fp32,
one process (TP=1, PP=1); 8 prompts of 8 to 64 tokens, `--new-tokens` new tokens each (no stop
ids, so every row generates them all). Throughput is new tokens per second of a whole `generate`
call (prefill included). The three runs alternate, `--repeats` times; the ratios use each one's
best run, since other processes on the machine can only slow a run down (medians are printed too).
HF runs with its own defaults (`generate`, dynamic KV cache, SDPA attention) and without our CPU
compatibility layer, as a user would run it. Last line: `kv_speedup=<x> vs_hf_generate=<y>`
(ours / theirs, tokens per second).
"""

import argparse
import os
import statistics
import time

import torch
# Imported before the CPU compatibility layer replaces torch.cuda.Stream with a function:
# transformers 5 evaluates `torch.cuda.Stream | None` when its generation code is imported.
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_tropd.models.arch import ModelArch

ARCH = ModelArch(family="llama", vocab_size=32000, hidden_size=256, ffn_hidden_size=768,
                 num_layers=4, num_attention_heads=8, num_query_groups=4,
                 max_position_embeddings=1024)
PROMPT_LENGTHS = (8, 16, 24, 32, 40, 48, 56, 64)


def hf_llama_state_dict(megatron_sd: dict, arch: ModelArch) -> dict:
    """HF Llama tensors from a global megatron state dict (local layer spec names).

    A minimal mapping for this benchmark only; the project's HF <-> Megatron converter replaces
    it. Megatron's fused QKV rows are grouped per key/value group, `[q heads of the group | k | v]`;
    `linear_fc1` is `cat(gate, up)`.
    """
    groups, heads_per_group = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    out = {
        "model.embed_tokens.weight": megatron_sd["embedding.word_embeddings.weight"],
        "model.norm.weight": megatron_sd["decoder.final_layernorm.weight"],
        "lm_head.weight": megatron_sd["output_layer.weight"],
    }
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = megatron_sd[src + "self_attention.linear_qkv.weight"]
        qkv = qkv.view(groups, heads_per_group + 2, arch.head_dim, arch.hidden_size)
        gate, up = megatron_sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": qkv[:, :heads_per_group].reshape(-1, arch.hidden_size),
            dst + "self_attn.k_proj.weight": qkv[:, heads_per_group].reshape(-1, arch.hidden_size),
            dst + "self_attn.v_proj.weight": qkv[:, heads_per_group + 1].reshape(-1, arch.hidden_size),
            dst + "self_attn.o_proj.weight": megatron_sd[src + "self_attention.linear_proj.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": megatron_sd[src + "mlp.linear_fc2.weight"],
            dst + "input_layernorm.weight": megatron_sd[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": megatron_sd[src + "pre_mlp_layernorm.weight"],
        })
    return out


def build_hf_model(megatron_sd: dict):
    model = LlamaForCausalLM(LlamaConfig(**ARCH.to_hf_config())).eval()
    model.load_state_dict(hf_llama_state_dict(megatron_sd, ARCH), strict=True)
    model.generation_config.eos_token_id = None  # every row generates all new tokens
    model.generation_config.pad_token_id = 0
    return model


def _responses(batch):
    """`[B, new tokens]`: the greedy rows' new tokens (no stop ids: all of one length)."""
    return torch.tensor(batch.responses())


def hf_generate(model, prompts, new_tokens: int):
    """Greedy HF generation of left-padded prompts: the new tokens `[B, new_tokens]`."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens,
                             do_sample=False)
    return out[:, width:]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for all three (default: torch's, one per core); one "
                             "thread gives steadier figures on a machine shared with other work")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_PORT", "29731")
    from megatron_tropd.checkpoint.sharding import global_state_dict
    from megatron_tropd.models.builder import build_model
    from megatron_tropd.rollout.generate import SamplingParams, generate
    from megatron_tropd.runtime import initialize

    initialize.initialize_distributed(1, 1, seed=1234)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(ARCH, "student")
    hf_model = build_hf_model(global_state_dict(model, ARCH.vocab_size))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, ARCH.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    n_tokens = len(prompts) * args.new_tokens

    runs = {
        "kv_cache": lambda: _responses(generate(model, prompts, params, ARCH.vocab_size)),
        "recompute": lambda: _responses(generate(model, prompts, params, ARCH.vocab_size,
                                                 use_kv_cache=False)),
        "hf_generate": lambda: hf_generate(hf_model, prompts, args.new_tokens),
    }
    warm = SamplingParams(temperature=0.0, max_new_tokens=8)
    generate(model, prompts, warm, ARCH.vocab_size)
    hf_generate(hf_model, prompts, 8)

    seconds = {name: [] for name in runs}
    outputs = {}
    print(f"threads: {torch.get_num_threads()}; load average before: {os.getloadavg()[0]:.1f}",
          flush=True)
    for repeat in range(args.repeats):
        for name, run in runs.items():
            elapsed, outputs[name] = timed(run)
            seconds[name].append(elapsed)
            print(f"repeat {repeat} {name:12s} {n_tokens / elapsed:8.1f} tok/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    best = {name: n_tokens / min(s) for name, s in seconds.items()}
    median = {name: n_tokens / statistics.median(s) for name, s in seconds.items()}
    for name in runs:
        print(f"{name:12s} best {best[name]:8.1f} median {median[name]:8.1f} new tok/s")
    same_as_recompute = torch.equal(outputs["kv_cache"], outputs["recompute"])
    agree_hf = (outputs["kv_cache"] == outputs["hf_generate"]).float().mean().item()
    print(f"kv cache tokens == recompute tokens: {same_as_recompute}; "
          f"tokens equal to HF generate's: {agree_hf:.1%}")
    print(f"medians: kv_speedup={median['kv_cache'] / median['recompute']:.2f} "
          f"vs_hf_generate={median['kv_cache'] / median['hf_generate']:.2f}")
    print(f"kv_speedup={best['kv_cache'] / best['recompute']:.2f} "
          f"vs_hf_generate={best['kv_cache'] / best['hf_generate']:.2f}")


if __name__ == "__main__":
    main()
