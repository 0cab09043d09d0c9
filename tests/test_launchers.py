"""The launchers in examples/: every script parses (`bash -n`); the commands they build in dry-run
mode are checked against the real argument parsers (trainer and conversion tool) and against the
paper's hyper-parameters written out here; the SLURM script, run with a faked SLURM (`scontrol`
and `srun` on PATH), starts the expected torchrun command on each node and requeues itself on
SIGUSR1. No process group is started: each case is a bash run of a fraction of a second."""

import glob
import importlib.util
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from megatron_tropd import arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch")))


def _bash(script, env, *args, cwd=ROOT):
    return subprocess.run(["bash", script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DRY_RUN": "1", **env})


def _dry_run(script, env, *args):
    """The commands a launcher prints in dry-run mode, each split into words."""
    result = _bash(os.path.join("examples", script), env, *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _trainer_args(command, world_size, monkeypatch):
    """Parse and validate the trainer flags of a torchrun command line (bf16 is checked as on a
    GPU host)."""
    assert command[0] == "torchrun"
    flags = command[command.index("megatron_tropd.train") + 1:]
    assert command[command.index("megatron_tropd.train") - 1] == "-m"
    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
    args = arguments.parse_args(flags)
    arguments.validate_args(args, world_size)
    return args


@pytest.fixture()
def paths(tmp_path):
    """Existing student/teacher/prompts paths (validate_args checks that they exist)."""
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    for name in ("prompts.jsonl", "responses.jsonl"):
        (tmp_path / name).write_text("")
    return dict(STUDENT=str(tmp_path / "student"), TEACHER=str(tmp_path / "teacher"),
                PROMPTS=str(tmp_path / "prompts.jsonl"))


@pytest.mark.parametrize("script", [os.path.relpath(s, ROOT) for s in SCRIPTS])
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


# The paper's setting (docs/METHODS.md, "Paper hyper-parameters"), independent of the launcher.
PAPER = dict(train_iters=200, lr=5e-6, lr_warmup_iters=0, weight_decay=0.1,
             prompts_per_iteration=128, samples_per_prompt=4, max_new_tokens=8192, temperature=1.0,
             top_p=1.0, teacher_topk=64, prefix_beta=0.001, clip_grad=1.0,
             tensor_model_parallel_size=2, bf16=True, transformer_engine=True)

METHODS = {  # METHOD -> what the papers set beyond --distill-method
    "tropd": dict(method="tropd", trust_region="stochastic", outlier_mode="fkl",
                  prefix_source="online", prefix_anneal_steps=200),
    "opd": dict(method="opd", prefix_source="none", ppo_clip=None),
    "eopd": dict(method="eopd", ppo_clip=0.2, eopd_entropy_threshold=0.8, eopd_topk=16),
    "reopold": dict(method="reopold", reopold_fraction=0.5),
    "reopold-2stage": dict(method="reopold-2stage", reopold_fraction=0.5, reopold_stage2_step=100),
    "jsd": dict(method="jsd", jsd_beta=0.5),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_distill_builds_a_valid_command_for_each_method(method, paths, monkeypatch):
    (command,) = _dry_run("distill.sh", dict(paths, METHOD=method))
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    args = _trainer_args(command, 8, monkeypatch)
    for name, value in {**PAPER, **METHODS[method]}.items():
        assert getattr(args, name) == value, name
    assert args.save == f"runs/{method}"


def test_distill_offline_guidance_and_overrides(paths, monkeypatch, tmp_path):
    """TEACHER_RESPONSES switches TrOPD to offline guidance; sizes come from the environment and
    extra arguments reach the trainer last."""
    env = dict(paths, TEACHER_RESPONSES=str(tmp_path / "responses.jsonl"), NPROC_PER_NODE="4",
               TP="4", PP="1", TRAIN_ITERS="30", PROMPTS_PER_ITERATION="16", MAX_NEW_TOKENS="128",
               BF16="0", TE="0", SAVE=str(tmp_path / "run"))
    (command,) = _dry_run("distill.sh", env, "--lr", "1e-5", "--save-interval", "5")
    args = _trainer_args(command, 4, monkeypatch)
    assert (args.prefix_source, args.teacher_responses) == ("offline", env["TEACHER_RESPONSES"])
    assert (args.tensor_model_parallel_size, args.train_iters, args.prefix_anneal_steps) == (4, 30, 30)
    assert (args.prompts_per_iteration, args.max_new_tokens, args.lr, args.save_interval) == (
        16, 128, 1e-5, 5)
    assert not args.bf16 and not args.transformer_engine and args.save == env["SAVE"]


def test_distill_multi_node_needs_a_rendezvous_endpoint(paths):
    result = _bash("examples/distill.sh", dict(paths, NNODES="2"))
    assert result.returncode != 0 and result.stdout == ""
    assert "RDZV_ENDPOINT=host:port of the first node is needed with NNODES=2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _tool(name):
    """tools/<name>.py as a module (its argument parser)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_paper_recipe_commands(paths, monkeypatch):
    """Convert both models at TP=2 on two processes, distil on 8, export the last checkpoint."""
    env = dict(HF_STUDENT="/m/Qwen3-1.7B", HF_TEACHER="/m/Qwen3-8B", PROMPTS=paths["PROMPTS"],
               WORK="w")
    convert_student, convert_teacher, distill, export = _dry_run("qwen3_1.7b_from_8b.sh", env)
    tool = _tool("convert_checkpoint")
    for command, hf_dir, output in ((convert_student, "/m/Qwen3-1.7B", "w/student"),
                                    (convert_teacher, "/m/Qwen3-8B", "w/teacher")):
        assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
        assert command[4].endswith("tools/convert_checkpoint.py")
        parsed = tool._parse_args(command[5:])
        assert (parsed.command, parsed.hf_dir, parsed.output_dir) == ("hf-to-megatron", hf_dir, output)
        assert (parsed.tensor_model_parallel_size, parsed.pipeline_model_parallel_size,
                parsed.dtype) == (2, 1, "bfloat16")
    monkeypatch.chdir(os.path.dirname(paths["STUDENT"]))
    os.makedirs("w/student")
    os.makedirs("w/teacher")
    args = _trainer_args(distill, 8, monkeypatch)
    assert (args.student_load, args.teacher_load, args.save, args.method) == (
        "w/student", "w/teacher", "w/tropd", "tropd")
    # the batch settings the memory plan says fit on 8 x 80 GiB (docs/PERFORMANCE.md)
    from megatron_tropd import memory_plan

    assert (args.rollout_batch_size, args.max_tokens_per_micro_batch, args.bf16,
            args.use_distributed_optimizer) == (32, 18432, True, True)
    plan = memory_plan.plan(memory_plan.config_from_args(
        args, memory_plan.load_arch("qwen3-1.7b"), memory_plan.load_arch("qwen3-8b"), 8, 80))
    assert plan.fits and plan.config.rows_per_rank == 160
    assert export[0] == "python" and export[1].endswith("tools/convert_checkpoint.py")
    parsed = tool._parse_args(export[2:])
    assert (parsed.command, parsed.megatron_dir, parsed.output_dir) == (
        "megatron-to-hf", "w/tropd/iter_0000200", "w/tropd-hf")


# --- SLURM, faked -------------------------------------------------------------------------------

FAKE_SCONTROL = """\
#!{python}
# scontrol stand-in: `show hostnames prefix[a-b]` expands the range; `requeue ID` is logged.
import os, re, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    prefix, first, last = re.fullmatch(r"(.*)\\[(\\d+)-(\\d+)\\]", sys.argv[3]).groups()
    for n in range(int(first), int(last) + 1):
        print(f"{{prefix}}{{n:0{{len(first)}}d}}")
else:
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
"""

FAKE_SRUN = """\
#!{python}
# srun stand-in: logs its options, then runs the command once per node with that node's SLURM
# variables (its dry-run output is the torchrun line of the node). With FAKE_PREEMPT=1 it first
# has the batch script signalled with SIGUSR1, as SLURM does before the time limit, and waits for
# the signal the script forwards.
import os, signal, subprocess, sys, time
first = next(i for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("-"))
options, command = sys.argv[1:first], sys.argv[first:]
log = open(os.environ["FAKE_LOG"], "a")
log.write("srun " + " ".join(options) + "\\n")
log.flush()
if os.environ.get("FAKE_PREEMPT") == "1":
    def stop(signum, frame):
        log.write(f"srun got {{signal.Signals(signum).name}}\\n")
        sys.exit(0)
    signal.signal(signal.SIGUSR1, stop)
    time.sleep(0.5)  # the batch script has recorded srun's pid by then
    os.kill(os.getppid(), signal.SIGUSR1)
    time.sleep(30)
    sys.exit(3)
hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                       capture_output=True, text=True).stdout.split()
for node, host in enumerate(hosts):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURMD_NODENAME=host)
    subprocess.run(command, env=env, check=True)
"""


@pytest.fixture()
def fake_slurm(tmp_path, paths):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return dict(paths, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                FAKE_LOG=str(tmp_path / "fake.log"), SLURM_JOB_NODELIST="node[01-03]",
                SLURM_NNODES="3", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT,
                GPUS_PER_NODE="4", PROMPTS_PER_ITERATION="96", LOG_DIR=str(tmp_path / "logs"), METHOD="opd", BF16="0",
                TE="0")


def test_slurm_starts_torchrun_on_every_node(fake_slurm, monkeypatch):
    result = _bash("examples/slurm/distill.sbatch", fake_slurm, "--seed", "7")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()
                if line.startswith("torchrun")]
    trainer = shlex.split(textwrap.dedent(f"""\
        -m megatron_tropd.train --student-load {fake_slurm['STUDENT']}
        --teacher-load {fake_slurm['TEACHER']} --tensor-model-parallel-size 2
        --pipeline-model-parallel-size 1 --use-distributed-optimizer --distill-method opd
        --samples-per-prompt 4 --max-new-tokens 8192 --temperature 1.0 --top-p 1.0
        --teacher-topk 64 --rollout-batch-size 32 --train-iters 200 --prompts-per-iteration 96
        --max-tokens-per-micro-batch 18432
        --lr 5e-6 --lr-warmup-iters 0 --lr-decay-style constant --weight-decay 0.1 --clip-grad 1.0
        --seed 1234 --prompts {fake_slurm['PROMPTS']} --prompt-template auto
        --max-prompt-length 1024 --save runs/opd --save-interval 20 --log-interval 1 --seed 7"""))
    expected = [["torchrun", "--nnodes", "3", "--node-rank", str(node), "--nproc-per-node", "4",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", "node01:29500", "--rdzv-id", "4242",
                 "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "--shutdown-timeout", "540", *trainer] for node in range(3)]
    assert commands == expected
    assert _trainer_args(commands[0], 12, monkeypatch).seed == 7
    with open(fake_slurm["FAKE_LOG"]) as f:
        log = f.read().splitlines()
    assert log == [f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append "
                   f"--output={fake_slurm['LOG_DIR']}/%x-%j-node%n.log"]
    assert "rendezvous node01:29500" in result.stdout


def test_slurm_forwards_sigusr1_and_requeues(fake_slurm):
    result = _bash("examples/slurm/distill.sbatch", dict(fake_slurm, FAKE_PREEMPT="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    with open(fake_slurm["FAKE_LOG"]) as f:
        log = f.read().splitlines()
    assert log[1:] == ["srun got SIGUSR1", "scontrol requeue 4242"]
    assert "requeueing job 4242" in result.stdout


def test_slurm_passes_a_failure_on_without_requeue(fake_slurm):
    """A node whose command fails: srun's status is the job's, and nothing is requeued."""
    result = _bash("examples/slurm/distill.sbatch", dict(fake_slurm, METHOD="tropd",
                                                         TEACHER_RESPONSES="", STUDENT=""))
    assert result.returncode != 0
    assert "STUDENT=Megatron checkpoint of the student" in result.stderr
    with open(fake_slurm["FAKE_LOG"]) as f:
        log = f.read().splitlines()
    assert len(log) == 1 and log[0].startswith("srun ")  # no requeue


def test_teacher_responses_command():
    env = dict(TEACHER="t", PROMPTS="p.jsonl", OUTPUT="o.jsonl", TOKENIZER="tok",
               NPROC_PER_NODE="4")
    (command,) = _dry_run("generate_teacher_responses.sh", env)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "4"]
    assert command[4].endswith("tools/generate_teacher_responses.py")
    args = _tool("generate_teacher_responses").parse_args(command[5:])
    assert (args.load, args.prompts, args.output, args.tokenizer) == (
        "t", "p.jsonl", "o.jsonl", "tok")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.max_new_tokens, args.temperature, args.seed) == (2, 1, 8192, 1.0, 1234)
