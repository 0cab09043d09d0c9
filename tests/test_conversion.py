"""HF <-> Megatron checkpoint conversion, checked against HF transformers on tiny random models
built here from configs (no downloads; norm weights and biases perturbed so that they matter):

  llama    GQA (4 heads, 2 groups), Llama-3 RoPE scaling, untied, sharded safetensors input
  qwen2    MHA, QKV biases, tied embeddings (last-stage copy at PP=2)
  qwen3    GQA, QK-norm, head_dim 24 != hidden/heads, untied
  mistral  MQA (1 group: TP=1 only)

- fp32 parity against transformers (max |logit diff| <= 1e-4, KL <= 1e-8) of every model
  converted at TP 1/2 x PP 1/2, and of checkpoints loaded at a layout other than the one they
  were saved at (the padded vocabulary is 384 rows at TP=1 and 512 at TP=2);
- HF -> Megatron -> HF bit-exact on every tensor, key sets equal both ways, for every checkpoint;
  the HF -> megatron mapping names exactly the parameters the model's stages hold;
- bad input: a one-line error and no output directory;
- tools/compare_hf_megatron.py as a gate: exit status 2 and a one-line error on configs that differ
  and on logits beyond its thresholds.

The four layouts run as four spawned runs (in an order that lets each load a checkpoint another
layout saved); the last, at TP=1/PP=1, also exports every checkpoint back to HF.
"""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_tropd.runtime.testing import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
TOKENS = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
MAX_ABS_LOGIT_DIFF, MAX_KL = 1e-4, 1e-8

FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=16384,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=True,
                  rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=24),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, rms_norm_eps=1e-5),
}
# (tp, pp) in run order, and the layout whose checkpoints each run also loads.
LAYOUTS = [((1, 2), None), ((2, 2), (1, 2)), ((2, 1), (2, 2)), ((1, 1), (2, 1))]


def _fits(family, tp):
    return FAMILIES[family]["num_key_value_heads"] % tp == 0


def _ckpt(root, family, layout):
    return os.path.join(root, "megatron", f"{family}_tp{layout[0]}pp{layout[1]}")


# --- the tiny HF models ----------------------------------------------------------------------------


def _make_hf_model(directory, family, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, initializer_range=0.1, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
    # Sharded input files (an index) for one family; the rest as a single file.
    model.save_pretrained(directory, max_shard_size="200KB" if family == "llama" else "50GB")
    _write_tokenizer(directory)


def _write_tokenizer(directory):
    """A word-level tokenizer over VOCAB tokens: its files must travel through the checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def _hf_tensors(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for name in files:
        out.update(load_file(os.path.join(directory, name)))
    return out


# --- run inside the spawned processes --------------------------------------------------------------


def _convert_load_evaluate(root, layout, loads_from, export):
    """Convert every family that fits this layout, evaluate it and the checkpoints `loads_from`
    saved; with `export`, also export every checkpoint in `root` back to HF."""
    from megatron.core import parallel_state as ps

    from megatron_tropd.checkpoint.conversion import hf_to_megatron, megatron_to_hf
    from megatron_tropd.checkpoint.model_dir import load_model
    from megatron_tropd.checkpoint.parity import forward_logits
    from megatron_tropd.checkpoint.sharding import to_global_name
    from megatron_tropd.models.arch import ModelArch
    from megatron_tropd.models.builder import build_model

    tp = layout[0]
    jobs = []
    for family in FAMILIES:
        if _fits(family, tp):
            hf_to_megatron(os.path.join(root, "hf", family), _ckpt(root, family, layout))
            jobs.append((family, layout))
            if loads_from is not None and _fits(family, loads_from[0]):
                jobs.append((family, loads_from))
    logits, params = {}, {}
    for family, saved_at in jobs:
        ckpt = _ckpt(root, family, saved_at)
        arch = ModelArch.from_file(ckpt)
        model = build_model(arch, "teacher", perform_initialization=False)
        load_model(ckpt, model)
        out = forward_logits(model, TOKENS, arch.vocab_size)
        if out is not None and ps.get_tensor_model_parallel_rank() == 0:
            logits[(family, saved_at, layout)] = out
        params[(family, layout)] = {to_global_name(model, n) for n, _ in model.named_parameters()
                                    if n != "output_layer.weight" or not arch.tie_word_embeddings}
    if export:
        megatron_root = os.path.join(root, "megatron")
        for name in sorted(os.listdir(megatron_root)):
            megatron_to_hf(os.path.join(megatron_root, name), os.path.join(root, "export", name),
                           max_shard_bytes=150_000)  # several output shards for the writer
        bf16 = os.path.join(root, "bf16")
        hf_to_megatron(os.path.join(root, "hf", "llama"), bf16, dtype=torch.bfloat16)
        megatron_to_hf(bf16, os.path.join(root, "export", "llama_bf16"))
    return logits, params


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every conversion and evaluation: the root directory, logits by (family, saved_at,
    loaded_at), and the global names of the parameters all ranks hold by (family, layout)."""
    root = str(tmp_path_factory.mktemp("conversion"))
    for i, family in enumerate(FAMILIES):
        _make_hf_model(os.path.join(root, "hf", family), family, seed=i)
    logits, params = {}, {}
    for layout, loads_from in LAYOUTS:
        tp, pp = layout
        ranks = run_distributed(_convert_load_evaluate, world_size=tp * pp, tp=tp, pp=pp,
                                args=(root, layout, loads_from, layout == (1, 1)))
        for rank_logits, rank_params in ranks:
            logits.update(rank_logits)
            for key, names in rank_params.items():
                params.setdefault(key, set()).update(names)
    return SimpleNamespace(root=root, logits=logits, params=params)


@pytest.fixture(scope="module")
def reference_logits(converted):
    from megatron_tropd.checkpoint.parity import hf_logits

    root = converted.root
    return {f: hf_logits(os.path.join(root, "hf", f), TOKENS) for f in FAMILIES}


# --- parity ----------------------------------------------------------------------------------------

CASES = [(f, saved_at, loaded_at)
         for loaded_at, loads_from in LAYOUTS
         for saved_at in (loaded_at, loads_from) if saved_at is not None
         for f in FAMILIES if _fits(f, loaded_at[0]) and _fits(f, saved_at[0])]


@pytest.mark.parametrize("family,saved_at,loaded_at", CASES,
                         ids=[f"{f}-saved_tp{s[0]}pp{s[1]}-loaded_tp{l[0]}pp{l[1]}"
                              for f, s, l in CASES])
def test_parity_with_transformers(converted, reference_logits, family, saved_at, loaded_at):
    from megatron_tropd.checkpoint.parity import format_parity, logit_parity

    logits = converted.logits
    parity = logit_parity(reference_logits[family], logits[(family, saved_at, loaded_at)])
    print(f"{family} saved {saved_at} loaded {loaded_at}: {format_parity(parity)}")
    assert parity["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF, parity
    assert parity["kl"] <= MAX_KL, parity
    assert parity["top1_agree"] == 1.0, parity


def test_logits_are_not_trivially_small(reference_logits):
    """The random models' logits spread wide enough for the 1e-4 bound to mean something."""
    for family, logits in reference_logits.items():
        assert logits.std() > 0.5, family


# --- round trip ------------------------------------------------------------------------------------

ROUND_TRIPS = [(f, layout) for layout, _ in LAYOUTS for f in FAMILIES if _fits(f, layout[0])]


@pytest.mark.parametrize("family,layout", ROUND_TRIPS,
                         ids=[f"{f}-tp{l[0]}pp{l[1]}" for f, l in ROUND_TRIPS])
def test_round_trip_is_bit_exact(converted, family, layout):
    root = converted.root
    name = os.path.basename(_ckpt(root, family, layout))
    exported, original = (_hf_tensors(os.path.join(root, "export", name)),
                          _hf_tensors(os.path.join(root, "hf", family)))
    assert sorted(exported) == sorted(original)  # both ways: nothing missing, nothing extra
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
    tied = FAMILIES[family].get("tie_word_embeddings", False)
    assert ("lm_head.weight" in exported) == (not tied)


@pytest.mark.parametrize("family,layout", ROUND_TRIPS,
                         ids=[f"{f}-tp{l[0]}pp{l[1]}" for f, l in ROUND_TRIPS])
def test_megatron_key_sets_match(converted, family, layout):
    """The mapping names exactly the parameters the model's stages hold together (no tensor
    left unfilled, none converted for nothing)."""
    from megatron_tropd.checkpoint.hf_mapping import tensor_mappings
    from megatron_tropd.models.arch import ModelArch

    arch = ModelArch.from_file(os.path.join(converted.root, "hf", family))
    assert converted.params[(family, layout)] == {m.megatron for m in tensor_mappings(arch)}


def test_export_loads_in_transformers_with_tokenizer(converted, reference_logits):
    """The exported directory is a complete HF model: transformers loads the weights, the config
    and the tokenizer, and computes the original's logits exactly."""
    from transformers import AutoTokenizer

    from megatron_tropd.checkpoint.parity import hf_logits

    root = converted.root
    for family, layout in [("qwen2", (2, 2)), ("llama", (1, 2))]:
        exported = os.path.join(root, "export", os.path.basename(_ckpt(root, family, layout)))
        assert torch.equal(hf_logits(exported, TOKENS), reference_logits[family]), family
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            with open(os.path.join(root, "hf", family, name), "rb") as f:
                assert open(os.path.join(exported, name), "rb").read() == f.read(), name
        original = AutoTokenizer.from_pretrained(os.path.join(root, "hf", family)).get_vocab()
        assert AutoTokenizer.from_pretrained(exported).get_vocab() == original
    assert os.path.exists(os.path.join(exported, "model.safetensors.index.json"))


def test_bfloat16_conversion(converted):
    root = converted.root
    exported = _hf_tensors(os.path.join(root, "export", "llama_bf16"))
    original = _hf_tensors(os.path.join(root, "hf", "llama"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor.to(torch.bfloat16)), key
    with open(os.path.join(root, "bf16", "megatron_tropd.json")) as f:
        assert json.load(f)["params_dtype"] == "bfloat16"


# --- bad input -------------------------------------------------------------------------------------


def _run_tool(args, capsys):
    """tools/convert_checkpoint.py in this process (every input check runs before megatron is
    started): (exit status, stderr)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    from megatron_tropd import errors

    with pytest.raises(SystemExit) as exc:
        errors.run_main(convert_checkpoint.main, args)
    return exc.value.code, capsys.readouterr().err


def _copy_model(src, dst, edit_config=None):
    import shutil

    shutil.copytree(src, dst)
    if edit_config:
        path = os.path.join(dst, "config.json")
        config = json.load(open(path))
        edit_config(config)
        json.dump(config, open(path, "w"))
    return dst


def _truncate(directory):
    path = os.path.join(directory, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    return {}


def _remove_shard(directory):
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    os.remove(os.path.join(directory, files[1]))
    return {"file": files[1]}


# case: (family, config edit, file edit, extra arguments, the whole stderr line)
BAD_HF_INPUT = {
    "unknown_architecture": (
        "qwen2", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), None, [],
        "unknown architecture 'gpt2': supported are llama, mistral, qwen2, qwen3"),
    "tp_not_dividing_heads": (
        "qwen2", None, None, ["--tp", "3"],
        "model: attention heads (4) are not divisible by tensor-model-parallel size 3"),
    "tp_not_dividing_kv_heads": (
        "mistral", None, None, ["--tp", "2"],
        "model: key/value heads (1) are not divisible by tensor-model-parallel size 2"),
    "pp_not_dividing_layers": (
        "qwen2", None, None, ["--pp", "3"],
        "model: layers (4) are not divisible by pipeline-model-parallel size 3"),
    "launch_smaller_than_layout": (
        "qwen2", None, None, ["--tp", "2"],
        "hf-to-megatron at TP=2 x PP=1 needs 2 process(es), this launch has 1: run it with "
        "`torchrun --nproc-per-node 2 ...`"),
    "truncated_safetensors": (
        "qwen2", None, _truncate, [],
        "cannot read safetensors file {hf}/model.safetensors: Error while deserializing header: "
        "incomplete metadata, file not fully covered"),
    "missing_safetensors": (
        "llama", None, _remove_shard, [],
        "missing safetensors file {hf}/{file} (listed in model.safetensors.index.json)"),
    "missing_tensors": (
        "qwen2", lambda c: c.update(model_type="qwen3"), None, [],
        "8 tensors missing from the weights: model.layers.0.self_attn.k_norm.weight, "
        "model.layers.0.self_attn.q_norm.weight, model.layers.1.self_attn.k_norm.weight, ... "
        "(5 more)"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF_INPUT))
def test_bad_hf_input_one_line_error_and_no_output(converted, tmp_path, capsys, case):
    root = converted.root
    family, edit_config, edit_files, extra_args, message = BAD_HF_INPUT[case]
    hf_dir = _copy_model(os.path.join(root, "hf", family), str(tmp_path / "hf"), edit_config)
    fields = edit_files(hf_dir) if edit_files else {}
    status, err = _run_tool(["hf-to-megatron", "--hf-dir", hf_dir,
                             "--output-dir", str(tmp_path / "out")] + extra_args, capsys)
    assert status == 2
    assert err == "error: " + message.format(hf=hf_dir, **fields) + "\n"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no partial directory


def test_existing_output_dir_needs_overwrite(converted, tmp_path, capsys):
    root = converted.root
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ckpt = _ckpt(root, "qwen2", (1, 1))
    status, err = _run_tool(["megatron-to-hf", "--megatron-dir", ckpt, "--output-dir", str(out)],
                            capsys)
    assert status == 2
    assert err == (f"error: output directory {out} exists and is not empty "
                   "(use --overwrite to replace it)\n")
    assert os.listdir(out) == ["keep.txt"]
    status, err = _run_tool(["megatron-to-hf", "--megatron-dir", str(tmp_path),
                             "--output-dir", str(tmp_path / "new")], capsys)
    assert status == 2
    assert err == f"error: {tmp_path} is not a megatron-tropd checkpoint (no megatron_tropd.json)\n"
    assert not (tmp_path / "new").exists()


def test_failed_write_leaves_nothing(tmp_path):
    from megatron_tropd.checkpoint import CheckpointError
    from megatron_tropd.checkpoint.model_dir import atomic_directory

    target = tmp_path / "out"
    # whatever a writer raises is the one-line error; an interrupt stays what it is
    for raised, expected in ((RuntimeError("killed halfway"), CheckpointError),
                             (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(expected) as caught:
            with atomic_directory(str(target)) as partial:
                open(os.path.join(partial, "half-written"), "w").close()
                raise raised
        if expected is CheckpointError:
            assert str(caught.value) == f"cannot write {target} (RuntimeError: killed halfway)"
        assert os.listdir(tmp_path) == []


def test_command_line(converted, tmp_path):
    """A real process: --help for a new user, a one-line error without traceback, and an
    export with --overwrite."""
    root = converted.root
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    env = dict(os.environ, PYTHONPATH=REPO)
    help_text = subprocess.run([sys.executable, tool, "hf-to-megatron", "--help"], env=env,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--hf-dir", "--output-dir", "--tensor-model-parallel-size", "--dtype",
                 "--overwrite"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, tool, "hf-to-megatron", "--hf-dir", str(tmp_path),
                          "--output-dir", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr == f"error: model config not found: {tmp_path}/config.json\n"
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ok = subprocess.run([sys.executable, tool, "megatron-to-hf", "--megatron-dir",
                         _ckpt(root, "qwen3", (1, 1)), "--output-dir", str(out), "--overwrite"],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]


def _compare(*args):
    """tools/compare_hf_megatron.py as a process of its own, on 2x32 tokens."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "compare_hf_megatron.py"), *args,
         "--seq-length", "32"], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
        text=True)


def _parity_line(result):
    """The values of the last stdout line, `max_abs_logit_diff=<x> kl=<y> top1_agree=<z>`."""
    last = result.stdout.strip().splitlines()[-1]
    values = dict(item.split("=") for item in last.split(" "))
    assert sorted(values) == ["kl", "max_abs_logit_diff", "top1_agree"], last
    return values


def test_compare_tool_last_line(converted):
    """tools/compare_hf_megatron.py on a checkpoint saved at TP=2 x PP=2, run as one process."""
    root = converted.root
    result = _compare("--hf-dir", os.path.join(root, "hf", "qwen2"),
                      "--megatron-dir", _ckpt(root, "qwen2", (2, 2)))
    assert result.returncode == 0, result.stderr
    values = _parity_line(result)
    assert float(values["max_abs_logit_diff"]) <= MAX_ABS_LOGIT_DIFF, values
    assert float(values["kl"]) <= MAX_KL and float(values["top1_agree"]) == 1.0, values


def _swap_gate_up(directory):
    """The gate and up projections exchanged in an HF copy: same config, wrong weights."""
    from safetensors.torch import save_file

    path = os.path.join(directory, "model.safetensors")
    other = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
    save_file({re.sub("gate_proj|up_proj", lambda m: other[m.group()], name): tensor
               for name, tensor in load_file(path).items()}, path)


def test_compare_tool_is_a_gate(converted, tmp_path):
    """Exit status 1 and a one-line error (no traceback) when the configs differ, before anything
    is loaded, and when the logits exceed a threshold, after the parity line."""
    root = converted.root
    qwen2, qwen3 = _ckpt(root, "qwen2", (1, 1)), _ckpt(root, "qwen3", (1, 1))
    fewer_layers = _copy_model(os.path.join(root, "hf", "qwen2"), str(tmp_path / "layers"),
                               lambda c: c.update(num_hidden_layers=2))
    for hf_dir, ckpt, difference in [
        (fewer_layers, qwen2, "num_layers (2 vs 4)"),
        (os.path.join(root, "hf", "qwen3"), qwen2, "family ('qwen3' vs 'qwen2')"),
        (os.path.join(REPO, "examples", "toy", "teacher"), qwen3, "vocab_size (20 vs 300)"),
    ]:
        result = _compare("--hf-dir", hf_dir, "--megatron-dir", ckpt)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"error: --hf-dir {hf_dir} and --megatron-dir {ckpt} differ in {difference}")
        assert "Traceback" not in result.stderr

    # max_position_embeddings is not compared: this copy runs, and fails only the threshold
    longer = _copy_model(os.path.join(root, "hf", "qwen3"), str(tmp_path / "longer"),
                         lambda c: c.update(max_position_embeddings=1024))
    swapped = _copy_model(os.path.join(root, "hf", "qwen2"), str(tmp_path / "swapped"))
    _swap_gate_up(swapped)
    for hf_dir, ckpt, extra, error in [
        (longer, qwen3, ["--max-abs-diff", "0"],
         "max_abs_logit_diff={max_abs_logit_diff} exceeds --max-abs-diff 0"),
        (swapped, qwen2, [], "max_abs_logit_diff={max_abs_logit_diff} exceeds --max-abs-diff "
                             "0.001; kl={kl} exceeds --max-kl 1e-06"),  # the float32 defaults
    ]:
        result = _compare("--hf-dir", hf_dir, "--megatron-dir", ckpt, *extra)
        assert result.returncode == 2, result.stderr
        values = _parity_line(result)
        assert result.stderr.splitlines()[-1] == "error: " + error.format(**values)
        assert "Traceback" not in result.stderr
    assert float(values["max_abs_logit_diff"]) > 1 and float(values["kl"]) > 0.1, values
