"""The memory plan: every component against a count by hand for a small config, the busiest stage
and the peak, the largest settings that fit, the shipped configs against the models' published
shapes, and one-line errors for bad input (tools/plan_memory.py end to end)."""

import dataclasses
import os
import subprocess
import sys

import pytest

from megatron_tropd import memory_plan as mp
from megatron_tropd.models.arch import ModelArch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = ModelArch(family="llama", vocab_size=1000, hidden_size=64, ffn_hidden_size=128,
                    num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=16)
TEACHER = ModelArch(family="qwen3", vocab_size=1000, hidden_size=96, ffn_hidden_size=192,
                    num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=24)
# TP=2, PP=2, DP=2; 2 prompts per rank x (3 samples + 1 guided row) = 8 rows of up to
# 20 + 10 + 10 = 40 tokens, half of them scored; micro-batches of 80 tokens = 2 rows
CONFIG = mp.PlanConfig(
    student=STUDENT, teacher=TEACHER, tensor_parallel=2, pipeline_parallel=2, gpus=8,
    gpu_memory_gib=1.0, bf16=True, distributed_optimizer=True, prompts_per_iteration=4,
    samples_per_prompt=3, prefix_rows=1, max_prompt_length=20, max_new_tokens=10,
    rollout_batch_size=3, micro_batch_size=None, max_tokens_per_micro_batch=80, teacher_topk=8,
    teacher_full=True)

# By hand. Vocabulary padded to a multiple of 128 x TP = 256: 1024, 512 columns per rank.
# Student layer per TP rank: QKV 64 x (64 + 2 x 32), projection 64 x 64, fc1 + fc2 3 x 64 x 128,
# halved, plus two norms of 64: 18432 + 128 = 18560. Its stage 1 (last): 2 layers, final norm,
# output layer 512 x 64: 37120 + 64 + 32768 = 69952 parameters.
# Teacher (Qwen3) layer: (96 x 192 + 96 x 96 + 3 x 96 x 192) / 2 = 41472, norms 192, QK norms 48:
# 41712; stage 1: 1 layer + final norm 96 + output layer 512 x 96 = 90960.
LAST_STAGE = {
    "student weights": 69952 * 2,
    "student gradients": 69952 * 4,                     # megatron DDP's fp32 buffer
    "optimizer states": 69952 * 12 / 2,                 # master + Adam m, v; over DP=2
    "teacher weights": 90960 * 2,
    # 320 ids (8 rows x 40) as ids, micro-batch ids and scored flags (17 B); 160 scored tokens
    # x (17 B of rollout fields + lp_T, entropy, uniform, selection 17 B + top-8 x 8 B + index)
    "token ids and record of the batch": 320 * 17 + 160 * (17 + 17 + 64 + 8),
    "rollout: KV cache": (3 + 1) * 40 * (2 * 2 * 1 * 16 * 2),  # slots + staging row, 2 layers
    # 80 prefill tokens x the MLP's peak 3 x 64 + 4 x 64 elements, bf16
    "rollout: prefill": 80 * 448 * 2,
    # 3 slots x 512 columns x (bf16 logits + three float64 temporaries), and 8 rows x 10 tokens
    # of (id, lp_S_old, entropy)
    "rollout: sampling": 3 * 512 * 26 + 8 * 10 * 16,
    # 80 tokens x (embedding 96 + the teacher's MLP peak 3 x 96 + 4 x 96)
    "teacher scoring: one micro-batch's forward": 80 * (96 + 672) * 2,
    "teacher scoring: logits": 40 * 512 * 2,
    "teacher scoring: top-k all-gather": 40 * 8 * 2 * 12,
    # 1 micro-batch in flight on the last stage, 80 tokens x (2 layers x (4 x 64 + 64 + 48 + 64
    # + 4 x 64) + final norm 64)
    "update (backward starts): saved activations": 80 * (2 * 688 + 64) * 2,
    "update (backward starts): one layer's backward": 80 * 448 * 2,
    "update (backward starts): logits and their gradients": 3 * 40 * 512 * 2,
    "update (backward starts): output layer's weight gradient": 512 * 64 * 2,
    "update (backward starts): teacher's forward": 80 * 672 * 2,
    "update (backward starts): teacher's logits": 40 * 512 * 2,
}


def test_every_component_of_the_last_stage():
    assert mp.components(CONFIG, stage=1) == LAST_STAGE


def test_first_stage_differs_where_it_holds_other_parts():
    first = mp.components(CONFIG, stage=0)
    # stage 0: 2 layers + the embedding, no final norm or output layer
    assert first["student weights"] == (37120 + 32768) * 2
    assert first["teacher weights"] == (41712 + 49152) * 2
    # 1F1B keeps both stages' worth of micro-batches (2) in flight on the first stage; no final
    # norm, no logits, no teacher top-k there; the embedding's gradient ends the backward
    assert first["update (backward starts): saved activations"] == 2 * 80 * 2 * 688 * 2
    assert first["update (backward ends): embedding's weight gradient"] == 512 * 64 * 2
    assert first["token ids and record of the batch"] == 320 * 17 + 160 * (17 + 8)
    assert "teacher scoring: logits" not in first and "rollout: packed decode weights" not in first


def test_peak_is_resident_plus_the_largest_phase_of_the_busiest_stage():
    p = mp.plan(CONFIG)
    parts = mp.components(CONFIG, p.stage)
    resident = sum(v for k, v in parts.items() if ":" not in k)
    phases = {}
    for key, value in parts.items():
        if ":" in key:
            phases[key.split(":")[0]] = phases.get(key.split(":")[0], 0) + value
    assert p.phases == phases and p.resident == resident
    assert p.peak == resident + max(phases.values())
    other = mp.Plan(CONFIG, 1 - p.stage, mp.components(CONFIG, 1 - p.stage))
    assert p.peak >= other.peak
    assert p.model_state == sum(parts[k] for k in mp.MODEL_STATE)


def test_cpu_counts_the_packed_decode_weights_and_composite_norms():
    cpu = dataclasses.replace(CONFIG, bf16=False, device="cpu")
    last = mp.components(cpu, stage=1)
    # two layers' four linear weights and the output layer, float32
    assert last["rollout: packed decode weights"] == 4 * (2 * 18432 + 32768)
    # each norm also keeps its normalised input: 2 x 64 more per layer, 64 more for the final
    assert last["update (backward starts): saved activations"] == 80 * (2 * (688 + 128) + 128) * 4


def test_tied_embedding_on_one_stage_holds_two_gradients():
    tied = dataclasses.replace(CONFIG, student=dataclasses.replace(STUDENT,
                                                                   tie_word_embeddings=True),
                               pipeline_parallel=1, gpus=4)
    parts = mp.components(tied, stage=0)
    assert parts["update (backward ends): embedding's weight gradient"] == 2 * 512 * 64 * 2
    assert parts["student weights"] == (4 * 18560 + 64 + 32768) * 2  # one shared matrix


def test_largest_token_budget_that_fits_is_the_edge():
    """A micro-batch may fill its whole token budget (rows of any length), so every token more
    costs memory: with the memory of a 160-token budget, 160 is the largest that fits."""
    edge = dataclasses.replace(CONFIG, max_tokens_per_micro_batch=160)
    limited = dataclasses.replace(CONFIG, gpu_memory_gib=mp.plan(edge).peak / mp.GIB)
    assert mp.largest_fitting(limited, "max_tokens_per_micro_batch", 40, 1 << 16) == 160


def test_paper_recipe_largest_settings_are_the_edge():
    """Qwen3-1.7B <- Qwen3-8B on 8 x 80 GiB: the settings the search reports fit, one more does
    not."""
    recipe = mp.PlanConfig(
        student=mp.load_arch("qwen3-1.7b"), teacher=mp.load_arch("qwen3-8b"), tensor_parallel=2,
        gpus=8, gpu_memory_gib=80, bf16=True, prompts_per_iteration=128, samples_per_prompt=4,
        prefix_rows=1, max_prompt_length=512, max_new_tokens=8192, rollout_batch_size=32,
        micro_batch_size=None, max_tokens_per_micro_batch=17408, teacher_topk=64)
    assert mp.plan(recipe).fits
    for field, low, high in (("rollout_batch_size", 1, 160),
                             ("max_tokens_per_micro_batch", 8704, 1 << 20)):
        value = mp.largest_fitting(recipe, field, low, high)
        assert low < value < high
        assert mp.plan(dataclasses.replace(recipe, **{field: value})).fits
        assert not mp.plan(dataclasses.replace(recipe, **{field: value + 1})).fits


def test_shipped_configs_have_the_published_shapes():
    """Hidden, FFN, layers, heads, key/value heads, head_dim, vocabulary, tied (the models' HF
    config.json files)."""
    expected = {
        "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936, True),
        "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936, True),
        "qwen3-4b": (2560, 9728, 36, 32, 8, 128, 151936, True),
        "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, False),
        "llama-3-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
    }
    assert mp.shipped_configs() == sorted(expected)
    for name, shape in expected.items():
        a = mp.load_arch(name)
        assert (a.hidden_size, a.ffn_hidden_size, a.num_layers, a.num_attention_heads,
                a.num_query_groups, a.head_dim, a.vocab_size, a.tie_word_embeddings) == shape


@pytest.mark.parametrize("change,message", [
    (dict(tensor_parallel=3, gpus=6),
     "student: attention heads (4) are not divisible by tensor-model-parallel size 3"),
    (dict(pipeline_parallel=3, gpus=6),
     "student: layers (4) are not divisible by pipeline-model-parallel size 3"),
    (dict(gpus=6), "6 GPUs do not divide into tensor-model-parallel 2 x pipeline-model-parallel 2"),
    (dict(prompts_per_iteration=3), "--prompts-per-iteration 3 is not divisible by the "
                                    "data-parallel size 2"),
    (dict(max_tokens_per_micro_batch=29), "--max-tokens-per-micro-batch 29 is below one row of "
                                          "--max-prompt-length + --max-new-tokens"),
])
def test_impossible_layouts_are_one_line_errors(change, message):
    with pytest.raises(mp.PlanError) as e:
        mp.plan(dataclasses.replace(CONFIG, **change))
    assert str(e.value) == message


def test_unknown_config_is_a_one_line_error():
    with pytest.raises(mp.PlanError, match=r"^unknown model config 'qwen3-2b': give a "
                                           r"config.json, a model directory or one of llama-3-8b, "
                                           r"qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b$"):
        mp.load_arch("qwen3-2b")


def test_flags_that_cannot_fit_are_one_line_errors():
    large = dataclasses.replace(CONFIG, max_tokens_per_micro_batch=320)
    one_row = dataclasses.replace(CONFIG, rollout_batch_size=1, max_tokens_per_micro_batch=40)
    between = (mp.plan(large).peak + mp.plan(one_row).peak) / 2 / mp.GIB
    with pytest.raises(mp.PlanError, match=r"^the peak is .* GiB per GPU, more than "
                                           r"--gpu-memory-gib .*: lower --rollout-batch-size or "
                                           r"--max-tokens-per-micro-batch"):
        mp.require_fit(dataclasses.replace(large, gpu_memory_gib=between))
    with pytest.raises(mp.PlanError, match="^does not fit at any batch setting: the models' "
                                           "state alone is"):
        mp.require_fit(dataclasses.replace(CONFIG, gpu_memory_gib=0.001))


RECIPE = ["--student", "qwen3-1.7b", "--teacher", "qwen3-8b", "--gpus", "8",
          "--tensor-model-parallel-size", "2", "--bf16", "--prompts-per-iteration", "128",
          "--samples-per-prompt", "4", "--prefix-source", "online", "--max-prompt-length", "512",
          "--max-new-tokens", "8192", "--rollout-batch-size", "32",
          "--max-tokens-per-micro-batch", "17408"]


def _tool(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"), *flags],
                          capture_output=True, text=True, cwd=ROOT)


def test_tool_plans_the_paper_recipe_and_refuses_what_cannot_fit():
    fits = _tool(*RECIPE, "--gpu-memory-gib", "80")
    assert fits.returncode == 0, fits.stderr
    assert "fits" in fits.stdout.splitlines()[-2] and "NOT" not in fits.stdout
    too_many_rows = _tool(*RECIPE, "--gpu-memory-gib", "80", "--rollout-batch-size", "100")
    assert too_many_rows.returncode == 2 and "NOT" in too_many_rows.stdout
    assert too_many_rows.stderr.count("\n") == 1
    assert too_many_rows.stderr.startswith("error: the peak is ")
    small = _tool(*RECIPE, "--gpu-memory-gib", "40")
    assert small.returncode == 2 and small.stderr.count("\n") == 1
    assert small.stderr.startswith("error: does not fit at any batch setting")
    for flags, start in ((("--student", "qwen9"), "error: unknown model config 'qwen9'"),
                         (("--gpus", "12", "--tensor-model-parallel-size", "3"),
                          "error: student: attention heads (16) are not divisible"),
                         (("--max-new-tokens", "x"), "error: argument --max-new-tokens")):
        out = _tool(*RECIPE, "--gpu-memory-gib", "80", *flags)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(start), out.stderr
