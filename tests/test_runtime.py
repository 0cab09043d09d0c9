"""Runtime: the CPU compatibility layer switches on only without CUDA; the entry point turns bad
input into a one-line error."""

import json
import os
import subprocess
import sys

from megatron_tropd.runtime.cli import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code_or_args, env_extra=None, module=False):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=ROOT, **(env_extra or {}))
    cmd = [sys.executable] + (["-m"] + code_or_args if module else ["-c", code_or_args])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cpu_layer_is_inert_when_cuda_is_available():
    out = _run(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = torch.cuda.current_device\n"
        "from megatron_tropd.runtime import cpu_compat\n"
        "assert cpu_compat.enable() is False and not cpu_compat.is_enabled()\n"
        "assert torch.cuda.current_device is before\n"
        "assert torch.overrides._get_current_function_mode_stack() == []\n"
        "print('inert')\n"
    )
    assert out.returncode == 0 and out.stdout.strip() == "inert", out.stderr


def test_cpu_layer_maps_cuda_to_cpu():
    out = _run(
        "import torch\n"
        "from megatron_tropd.runtime import cpu_compat\n"
        "assert cpu_compat.enable() is True\n"
        "assert torch.overrides._get_current_function_mode_stack() == []  # scoped, not global\n"
        "with cpu_compat.cuda_to_cpu():\n"
        "    with cpu_compat.cuda_to_cpu():  # nested: still one mode\n"
        "        assert len(torch.overrides._get_current_function_mode_stack()) == 1\n"
        "    x = torch.ones(3, device='cuda')\n"
        "    y = torch.zeros(2, device=torch.cuda.current_device()).cuda().to('cuda:0')\n"
        "    assert x.device.type == 'cpu' and y.device.type == 'cpu'\n"
        "    assert x.type() == 'torch.cuda.FloatTensor'\n"
        "assert torch.overrides._get_current_function_mode_stack() == []\n"
        "try:\n"
        "    torch.ones(1, device='cuda')  # outside the scope: CUDA is not there\n"
        "    raise SystemExit('a CUDA tensor outside the scope')\n"
        "except (AssertionError, RuntimeError):\n"
        "    pass\n"
        "from megatron.core import tensor_parallel\n"
        "tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)\n"
        "tracker = tensor_parallel.get_cuda_rng_tracker()\n"
        "outside = torch.get_rng_state()\n"
        "with tracker.fork():\n"
        "    a = torch.rand(4)\n"
        "assert torch.equal(outside, torch.get_rng_state())\n"
        "torch.manual_seed(5 + 2718)\n"
        "assert torch.equal(a, torch.rand(4))  # the model-parallel stream is seed + 2718 + tp_rank\n"
        "print('mapped')\n"
    )
    assert out.returncode == 0 and out.stdout.strip() == "mapped", out.stderr


def test_entry_point_errors_are_one_line(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    qwen3 = tmp_path / "qwen3.json"
    qwen3.write_text(json.dumps({"model_type": "qwen3", "vocab_size": 32, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Q:1+2=", "answer": "3"}\n')
    data = ["--prompts", str(prompts), "--tokenizer", str(prompts), "--train-iters", "1"]
    cases = [
        (["--student-config", str(gpt2), "--teacher-config", str(gpt2)] + data,
         "error: unknown architecture 'gpt2': supported are llama, mistral, qwen2, qwen3"),
        (["--student-load", str(tmp_path / "missing"), "--teacher-config", str(qwen3)] + data,
         f"error: --student-load {tmp_path / 'missing'} does not exist"),
        (["--student-config", str(qwen3), "--teacher-config", str(qwen3),
          "--tensor-model-parallel-size", "2"] + data,
         "error: world size 1 is not divisible by tensor-model-parallel size 2 x "
         "pipeline-model-parallel size 1"),
        (["--mode", "sft", "--student-config", str(qwen3)] + data,
         "error: --mode sft needs --sft-data"),
    ]
    for args, message in cases:
        out = _run(["megatron_tropd.train"] + args, module=True)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1] == message
