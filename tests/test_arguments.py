"""validate_args: each bad flag combination is one clear line, before anything is built."""

import pytest

from megatron_tropd.arguments import ArgumentError, parse_args, validate_args


@pytest.fixture
def files(tmp_path):
    for name in ("prompts.jsonl", "tok.model", "responses.jsonl"):
        (tmp_path / name).write_text("{}\n")
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    return tmp_path


def _args(files, *extra):
    return parse_args([
        "--student-load", str(files / "student"), "--teacher-load", str(files / "teacher"),
        "--prompts", str(files / "prompts.jsonl"), "--tokenizer", str(files / "tok.model"),
        "--train-iters", "10", "--prompts-per-iteration", "4", "--samples-per-prompt", "2",
        "--micro-batch-size", "2", *extra])


def test_good_flags_pass_and_give_the_data_parallel_size(files):
    assert validate_args(_args(files), world_size=4) == 4
    assert validate_args(_args(files, "--tensor-model-parallel-size", "2"), world_size=4) == 2


@pytest.mark.parametrize("extra,world,message", [
    (("--tensor-model-parallel-size", "3"), 4,
     "world size 4 is not divisible by tensor-model-parallel size 3 x pipeline-model-parallel size 1"),
    (("--prompts-per-iteration", "3"), 2,
     "--prompts-per-iteration 3 is not divisible by the data-parallel size 2"),
    (("--max-tokens-per-micro-batch", "700"), 1,
     "--max-tokens-per-micro-batch 700 is below one row of --max-prompt-length + --max-new-tokens "
     "= 768 tokens"),
    (("--rollout-batch-size", "0"), 1, "--rollout-batch-size must be >= 1"),
    (("--temperature", "0"), 1, "--temperature must be > 0 for on-policy sampling (log-probs of "
                                "the sampler are needed)"),
    (("--top-p", "1.5"), 1, "sampling flags --temperature / --top-k / --top-p: top_p must be in "
                            "(0, 1], got 1.5"),
    (("--clip-lambda", "1"), 1, "--clip-lambda must be in (0, 1)"),
    (("--jsd-beta", "2"), 1, "--jsd-beta must be in [0, 1]"),
    (("--ppo-clip", "1.5"), 1, "--ppo-clip must be in (0, 1) or none"),
    (("--distill-method", "eopd", "--eopd-topk", "100"), 1, "--eopd-topk 100 exceeds --teacher-topk 64"),
    (("--distill-method", "opd", "--prefix-source", "online"), 1,
     "--prefix-source (teacher-prefix guidance) is part of --distill-method tropd only"),
    (("--prefix-source", "offline"), 1, "--prefix-source offline needs --teacher-responses"),
    (("--min-lr", "1", "--lr", "0.1"), 1, "learning rates must satisfy 0 <= --min-lr <= --lr"),
    (("--lr-warmup-iters", "11"), 1, "--lr-warmup-iters must be in [0, --train-iters]"),
    (("--train-iters", "0"), 1, "--train-iters must be >= 1"),
    (("--reopold-fraction", "0"), 1, "--reopold-fraction must be in (0, 1]"),
    (("--bf16",), 1, "--bf16 needs a GPU (CPU runs are fp32)"),
])
def test_bad_flag_combinations(files, extra, world, message):
    with pytest.raises(ArgumentError) as e:
        validate_args(_args(files, *extra), world_size=world)
    assert str(e.value) == message


def test_missing_inputs(files):
    args = _args(files, "--prompts", str(files / "nope.jsonl"))
    with pytest.raises(ArgumentError, match=r"^--prompts .*nope.jsonl does not exist$"):
        validate_args(args)
    args = _args(files, "--student-config", str(files / "prompts.jsonl"))
    with pytest.raises(ArgumentError, match="^give exactly one of --student-load and --student-config$"):
        validate_args(args)
    args = parse_args(["--student-load", str(files / "student"), "--train-iters", "1",
                       "--teacher-load", str(files / "teacher")])
    with pytest.raises(ArgumentError, match="^--mode distill needs --prompts$"):
        validate_args(args)


@pytest.mark.parametrize("method,flags,expected", [
    ("eopd", (), 0.2),               # the EOPD paper's clip, without a flag
    ("eopd", ("--ppo-clip", "0.3"), 0.3),
    ("eopd", ("--ppo-clip", "none"), None),
    ("opd", (), None),
    ("opd", ("--ppo-clip", "0.1"), 0.1),
])
def test_method_defaults_apply_unless_a_flag_sets_them(files, method, flags, expected):
    from megatron_tropd.arguments import distill_config

    args = _args(files, "--distill-method", method, *flags)
    validate_args(args)
    assert distill_config(args).ppo_clip == expected


@pytest.mark.parametrize("method,flags,warned", [
    ("tropd", ("--temperature", "0.7"), True),
    ("opd", ("--top-p", "0.9", "--top-k", "20"), True),
    ("tropd", (), False),
    ("jsd", ("--temperature", "0.7"), False),  # no ratio, no trust test
])
def test_sampling_settings_the_ratio_methods_assume(files, capsys, method, flags, warned):
    validate_args(_args(files, "--distill-method", method, *flags))
    err = capsys.readouterr().err
    if warned:
        assert err.count("\n") == 1 and err.startswith("warning: ") and "lp_S_old" in err
        for flag in flags[::2]:
            assert flag in err
    else:
        assert err == ""
