"""Reliability: every bad input ends with its one-line message (the table in docs/RELIABILITY.md is
generated from `CASES` and checked against it), a non-finite step changes nothing, a failed save
keeps the previous checkpoint, and a run killed with SIGKILL in any phase or stopped by SIGTERM
resumes to the same weights and logged losses as an uninterrupted one.

    python tests/test_reliability.py     # prints the table for docs/RELIABILITY.md

Bad inputs run through `train.main` in one spawned TP=2 job (two ranks, so the checks that
ranks agree are exercised); the crash and signal tests run torchrun as users do.
"""

import contextlib
import dataclasses
import errno
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import toy_setup

from megatron_tropd.runtime.cli import free_port
from megatron_tropd.runtime.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "RELIABILITY.md")


@dataclasses.dataclass
class Case:
    """One bad input: what it is, the last line the user sees ({root}: the toy problem, {tmp}:
    the case's scratch directory) and the exit status."""

    bad_input: str
    message: str
    status: int = 2
    test: str = "test_bad_input"


CASES = {
    "malformed_json": Case(
        "a malformed JSONL line in --prompts",
        "error: {tmp}/prompts.jsonl:2: malformed JSON (Expecting ',' delimiter at column 21)"),
    "not_an_object": Case(
        "a JSONL line that is not an object",
        "error: {tmp}/prompts.jsonl:2: expected a JSON object, got an array"),
    "no_prompt_key": Case(
        "a prompt line without `prompt` or `messages`",
        "error: {tmp}/prompts.jsonl:2: needs exactly one of 'prompt' and 'messages', has neither"),
    "empty_prompts": Case(
        "an empty prompts file",
        "error: {tmp}/prompts.jsonl: empty file, no rows"),
    "prompt_too_long": Case(
        "a prompt longer than --max-prompt-length",
        "error: {root}/prompts.jsonl:1: prompt is 10 tokens, longer than the maximum prompt "
        "length 4"),
    "context_too_long": Case(
        "prompt + --max-new-tokens longer than the model's context",
        "error: row 0: context of 10 tokens + max_new_tokens 200 exceeds the model's maximum "
        "sequence length 128"),
    "unknown_method": Case(
        "an unknown --distill-method",
        "error: argument --distill-method: invalid choice: 'kd' (choose from 'opd', 'tropd', "
        "'eopd', 'reopold', 'reopold-2stage', 'jsd', 'fkl', 'entropy-opd') (see --help)"),
    "unknown_flag": Case(
        "an unknown flag",
        "error: unrecognized arguments: --lr-schedule cosine (see --help)"),
    "missing_value": Case(
        "a flag without its value",
        "error: argument --lr: expected one argument (see --help)"),
    "flag_combination": Case(
        "a bad flag combination (--prefix-source offline without responses)",
        "error: --prefix-source offline needs --teacher-responses"),
    "micro_batch": Case(
        "a --max-tokens-per-micro-batch below one row",
        "error: --max-tokens-per-micro-batch 20 is below one row of --max-prompt-length + "
        "--max-new-tokens = 24 tokens"),
    "missing_checkpoint": Case(
        "a --student-load directory that does not exist",
        "error: --student-load {tmp}/nope does not exist"),
    "not_a_checkpoint": Case(
        "a --teacher-load directory that is not a checkpoint",
        "error: model config not found: {tmp}/config.json"),
    "unknown_architecture": Case(
        "an unsupported architecture",
        "error: unknown architecture 'gpt2': supported are llama, mistral, qwen2, qwen3"),
    "vocab_mismatch": Case(
        "student and teacher vocabularies of different sizes",
        "error: student and teacher vocabularies differ (32 vs 40 rows): distillation needs the "
        "same tokenizer and vocabulary"),
    "tokenizer_mismatch": Case(
        "student and teacher tokenizers that differ (same size)",
        "error: student and teacher tokenizers differ at id 4 ('1' in {root}/tok.model, 'a' in "
        "{tmp}/teacher/tokenizer.model): distillation needs the same tokenizer"),
    "tokenizer_too_big": Case(
        "a tokenizer with more ids than the student's vocabulary",
        "error: the tokenizer {tmp}/big.model has 44 ids, more than the student's vocabulary of "
        "32"),
    "tp_kv_heads": Case(
        "TP that does not divide the key/value heads",
        "error: student: key/value heads (1) are not divisible by tensor-model-parallel size 2"),
    "pp_layers": Case(
        "PP that does not divide the layers",
        "error: student: layers (3) are not divisible by pipeline-model-parallel size 2"),
    "world_size": Case(
        "a world size that TP x PP does not divide",
        "error: world size 2 is not divisible by tensor-model-parallel size 4 x "
        "pipeline-model-parallel size 1"),
    "save_is_file": Case(
        "--save below a regular file",
        "error: --save {tmp}/file/run: cannot write there (Not a directory)"),
    "save_read_only": Case(
        "--save a read-only directory",
        "error: --save {tmp}/run: cannot write there (Permission denied)"),
    "disk_full": Case(
        "a full disk in the middle of a save (injected on rank 1: the RNG file of iteration 2)",
        "error: cannot write {tmp}/run/iter_0000002 (rank 1: No space left on device: "
        "{tmp}/run/.iter_0000002.partial/rng/rank_00001.pt); {tmp}/run/latest still names "
        "iteration 1"),
    "missing_shard": Case(
        "a missing shard of the resumed checkpoint",
        "error: cannot read checkpoint {tmp}/run/iter_0000001/model (No such file or directory: "
        "{tmp}/run/iter_0000001/model/__1_0.distcp)"),
    "truncated_shard": Case(
        "a truncated optimiser shard of the resumed checkpoint",
        "error: cannot read checkpoint {tmp}/run/iter_0000001/optimizer (EOFError)"),
    "corrupt_metadata": Case(
        "a corrupt dist_checkpointing .metadata file",
        "error: cannot read checkpoint {tmp}/run/iter_0000001/model (AssertionError: metadata "
        "is None; global metadata read failed: invalid load key, 'x'.)"),
    "corrupt_rng": Case(
        "a corrupt RNG file of the resumed checkpoint",
        "error: rank 0: cannot read {tmp}/run/iter_0000001/rng/rank_00000.pt (UnpicklingError: "
        "invalid load key, 'x'.)"),
    "corrupt_latest": Case(
        "a `latest` file that holds no iteration",
        "error: {tmp}/run/latest does not hold an iteration: 'half'"),
    "latest_missing_dir": Case(
        "a `latest` naming a checkpoint that is not there",
        "error: {tmp}/run/iter_0000009 is not a megatron-tropd checkpoint (no "
        "megatron_tropd.json)"),
    "load_without_latest": Case(
        "--load of a directory without checkpoints",
        "error: --load {tmp}/empty: no 'latest' file, so no checkpoint to resume from"),
    "resume_other_seed": Case(
        "resuming with another --seed",
        "error: cannot resume from {tmp}/run/iter_0000001: the data sampler state was saved with "
        "seed 7, this run has seed 8"),
    "resume_other_prompts": Case(
        "resuming with a prompts file of another size",
        "error: cannot resume from {tmp}/run/iter_0000001: the data sampler state (epoch 0, "
        "position 4, 4 consumed samples) does not fit 3 prompts"),
    "writer_error": Case(
        "a save whose writer raises something other than an OSError (torch.save's RuntimeError "
        "for a directory removed under it, injected on rank 1)",
        "error: cannot write {tmp}/run/iter_0000002 (rank 1: RuntimeError: Parent directory "
        "{tmp}/run/.iter_0000002.partial/rng does not exist.); {tmp}/run/latest still names "
        "iteration 1"),
    **{f"{flag}_{value}": Case(
        f"a non-finite `--{flag.replace('_', '-')} {value}`",
        f"error: --{flag.replace('_', '-')} must be a finite number, got {value}")
       for flag, value in (("lr", "nan"), ("lr", "inf"), ("temperature", "nan"),
                           ("clip_grad", "nan"))},
    "adam_beta": Case(
        "an Adam beta outside [0, 1)",
        "error: --adam-beta2 must be in [0, 1), got 1.0"),
    "clip_grad_negative": Case(
        "a negative --clip-grad",
        "error: --clip-grad must be >= 0, got -1.0"),
    "unknown_verifier": Case(
        "an unknown --verifier",
        "error: --verifier: unknown verifier 'nope': built-in ones are addition, exact, math, or "
        "give module:function"),
    "parquet_column": Case(
        "a Parquet prompts file without the prompt column (--prompt-key names another)",
        "error: {tmp}/prompts.parquet:row 0: needs exactly one of 'question' and 'messages', has "
        "neither"),
    "chat_template": Case(
        "--prompt-template chat with a tokenizer that has no chat template",
        "error: --prompt-template chat: the tokenizer {root}/tok.model has no chat template "
        "(auto falls back to the plain template)"),
    "unknown_characters": Case(
        "prompt text with characters the tokenizer maps to its unknown token (stdout)",
        "warning: {tmp}/prompts.jsonl: 2 row(s) hold characters the tokenizer maps to its "
        "unknown token (first at line 2: '€', 'ü')", status=0),
    "few_prompts": Case(
        "a prompts file with fewer prompts than --prompts-per-iteration (stdout)",
        "warning: {tmp}/prompts.jsonl has 3 prompts, fewer than --prompts-per-iteration 4: "
        "prompts repeat within an iteration", status=0),
    "resume_lr": Case(
        "resuming with another --lr (stdout)",
        "warning: resuming with --lr 0.0002 (checkpoint: 0.001): the checkpoint's values are "
        "used (--override-opt-param-scheduler uses the command line's)", status=0,
        test="test_resume_schedule"),
    "resume_lr_override": Case(
        "resuming with another --lr and --override-opt-param-scheduler (stdout)",
        "warning: resuming with --lr 0.0002 (checkpoint: 0.001): the command line's values are "
        "used (--override-opt-param-scheduler)", status=0, test="test_resume_schedule"),
    "resume_train_iters": Case(
        "resuming with a larger --train-iters (stdout)",
        "warning: resuming with --train-iters 4 (checkpoint: 2): the LR decay is re-planned to "
        "end at iteration 4", status=0, test="test_resume_schedule"),
    "resume_method": Case(
        "resuming with another method and batch shape (stdout)",
        "warning: resuming with --distill-method opd (checkpoint: tropd), --samples-per-prompt 1 "
        "(checkpoint: 2): the run goes on with the command line's", status=0),
    "nan_once": Case(
        "a NaN loss in one iteration (injected at iteration 2): the step is skipped, the run goes "
        "on (stdout)",
        "warning: iteration 2: non-finite loss or gradient, optimiser step skipped (1 in a row, "
        "--max-nonfinite-steps 5)", status=0, test="test_nonfinite_step_changes_nothing"),
    "nan_always": Case(
        "NaN losses --max-nonfinite-steps times in a row",
        "error: 2 optimiser steps in a row had a non-finite loss or gradient (the last at "
        "iteration 2): lower --lr, check the data, or raise --max-nonfinite-steps"),
    "exit_duration": Case(
        "--exit-duration-in-mins reached (stdout)",
        "stopped at iteration 1 of 3 (--exit-duration-in-mins 1e-06 reached): the same command "
        "resumes from the checkpoint", status=0),
}

# Rows of the crash tests (torchrun): {save} is the run's directory; the iterations come from the
# test's seeded choice.
CRASH_CASES = {
    "sigterm": Case(
        "SIGTERM to one rank in the middle of an iteration (SIGUSR1 to torchrun, which ignores "
        "it: `trap '' USR1`)",
        "stopped at iteration {stop} of 8 (SIGTERM received): the same command resumes from the "
        "checkpoint", status=0, test="test_killed_and_signalled_runs_resume_bit_exact"),
    **{f"sigkill_{phase}": Case(
        f"SIGKILL of every rank {where}; then the same command again (the dead run's "
        f"`<save>/.lock` does not block it)",
        "resumed from {save}/iter_{resumed:07d} at iteration {resumed}", status=-9,
        test="test_killed_and_signalled_runs_resume_bit_exact")
       for phase, where in (("rollout", "during a rollout"),
                            ("optimizer", "between the optimiser step and the LR step"),
                            ("save", "in the middle of writing a checkpoint"),
                            ("commit", "after the checkpoint directory, before `latest`"))},
}


# Rows of the concurrent-runs test (plain single-process runs): {save} is the contested --save,
# {pid} and {host} the first run's.
CONCURRENT_CASES = {
    "save_in_use": Case(
        "a second run on a --save another run holds (a requeued job overlapping its "
        "predecessor): it stops at once, the first finishes with its checkpoints intact",
        "error: --save {save} is in use by another run (pid {pid} on host {host})",
        test="test_concurrent_runs"),
    "two_single_process_runs": Case(
        "two single-process runs (no torchrun) at once on one host",
        "done: 2 iterations", status=0, test="test_concurrent_runs"),
    "port_in_use": Case(
        "torchrun's MASTER_PORT already taken on rank 0's host",
        "error: cannot start the process group at 127.0.0.1:{port} (EADDRINUSE: address already "
        "in use)", test="test_concurrent_runs"),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_setup.make_toy(str(tmp_path_factory.mktemp("toy")))


# --- bad inputs, inside one spawned TP=2 job ----------------------------------------------------


def _main(argv):
    """`train.main(argv)` as a user sees it: (exit status, stdout, stderr)."""
    from megatron_tropd import train

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.main(argv)
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def _flags(root, *extra, iters=2):
    return toy_setup.train_args(root, "--tensor-model-parallel-size", "2", *extra, iters=iters)


def _rank0() -> bool:
    """Files are prepared by rank 0 (the other rank computes the same paths)."""
    return torch.distributed.get_rank() == 0


def _write(path, *lines):
    if _rank0():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in lines)
    return str(path)


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if _rank0():
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _config(path, **fields):
    """A toy-sized HF config file (the student's, with `fields` changed)."""
    return _write(path, json.dumps({**toy_setup.STUDENT.to_hf_config(), **fields}))


def _sentencepiece(prefix, text, vocab_size=24):
    import sentencepiece as spm

    corpus = _write(prefix + ".txt", text)
    if _rank0():
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=vocab_size,
                                       model_type="char", character_coverage=1.0, pad_id=3,
                                       hard_vocab_limit=False, minloglevel=2)
    return prefix + ".model"


@contextlib.contextmanager
def _read_only(directory):
    """No new entries in `directory` (set by rank 0), also for root: chmod does not stop root,
    the immutable flag does. Yields the reason the OS will give."""
    as_root = os.geteuid() == 0
    if _rank0():
        if as_root:
            subprocess.run(["chattr", "+i", directory], check=True)
        else:
            os.chmod(directory, 0o500)
    torch.distributed.barrier()
    try:
        yield os.strerror(errno.EPERM if as_root else errno.EACCES)
    finally:
        torch.distributed.barrier()
        if _rank0():
            if as_root:
                subprocess.run(["chattr", "-i", directory], check=True)
            else:
                os.chmod(directory, 0o700)


def _saved_run(root, tmp, iters=1):
    """A trainer checkpoint of `iters` iterations in {tmp}/run (for the resume cases)."""
    status, _, err = _main(_flags(root, "--save", os.path.join(tmp, "run"), iters=iters))
    assert status == 0, err
    return os.path.join(tmp, "run")


def _prompts_case(lines):
    def prepare(root, tmp):
        return _flags(root, "--prompts", _write(os.path.join(tmp, "prompts.jsonl"), *lines))
    return prepare


def _resume_case(corrupt, *extra):
    def prepare(root, tmp):
        run = _saved_run(root, tmp)
        corrupt(run)
        return _flags(root, "--save", run, *extra)
    return prepare


def _remove_rank1_model_shard(run):
    if _rank0():
        os.remove(os.path.join(run, "iter_0000001", "model", "__1_0.distcp"))


def _truncate_optimizer_shard(run):
    path = os.path.join(run, "iter_0000001", "optimizer", "__0_0.distcp")
    if _rank0():
        os.truncate(path, os.path.getsize(path) // 2)


def _corrupt_model_metadata(run):
    _write(os.path.join(run, "iter_0000001", "model", ".metadata"), "x")


def _corrupt_rng(run):
    _write(os.path.join(run, "iter_0000001", "rng", "rank_00000.pt"), "x")


def _nan_loss(at_iterations):
    """Make `losses.compute_loss` NaN on rank 0 in the given iterations (two micro-batches an
    iteration in the toy runs; only the first of them poisoned)."""
    from megatron_tropd.distill import losses

    compute = losses.compute_loss
    calls = []

    def poisoned(x, config):
        out = compute(x, config)
        calls.append(None)
        iteration = (len(calls) + 1) // 2
        if _rank0() and len(calls) % 2 and iteration in at_iterations:
            out = dataclasses.replace(out, per_token=out.per_token * float("nan"))
        return out
    return poisoned


def _prepare_nan_always(root, tmp):
    from megatron_tropd.distill import losses

    losses.compute_loss = _nan_loss(range(1, 100))
    return _flags(root, "--max-nonfinite-steps", "2", iters=3)


def _failing_rng_save(error):
    """Rank 1's RNG file of iteration 2 raises `error(path)`."""
    def prepare(root, tmp):
        from megatron_tropd.checkpoint import checkpointer

        save = torch.save

        def failing(obj, path, *args, **kwargs):
            if str(path).endswith(".iter_0000002.partial/rng/rank_00001.pt"):
                raise error(str(path))
            return save(obj, path, *args, **kwargs)

        checkpointer.torch.save = failing
        return _flags(root, "--save", os.path.join(tmp, "run"), "--save-interval", "1")
    return prepare


def _disk_full(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _directory_gone(path):
    return RuntimeError(f"Parent directory {os.path.dirname(path)} does not exist.")


def _teacher_copy(root, tmp):
    teacher = os.path.join(tmp, "teacher")
    if _rank0():
        shutil.copytree(os.path.join(root, "teacher"), teacher)
    return teacher


def _prepare_tokenizer_mismatch(root, tmp):
    teacher = _teacher_copy(root, tmp)
    letters = _sentencepiece(os.path.join(tmp, "letters"), "abcdefghijklmnopqrst")
    if _rank0():
        shutil.copyfile(letters, os.path.join(teacher, "tokenizer.model"))
    return _flags(root, "--teacher-load", teacher)


def _prepare_vocab_mismatch(root, tmp):
    teacher = _teacher_copy(root, tmp)
    config = {**toy_setup.TEACHER.to_hf_config(), "vocab_size": 40}
    _write(os.path.join(teacher, "config.json"), json.dumps(config))
    return _flags(root, "--teacher-load", teacher)


def _prepare_load_without_latest(root, tmp):
    empty = os.path.dirname(_write(os.path.join(tmp, "empty", "notes.txt"), "nothing here"))
    return _flags(root, "--load", empty)


PREPARE = {
    "malformed_json": _prompts_case(['{"prompt": "Q:1+2="}', '{"prompt": "Q:1+2=" "answer"}']),
    "not_an_object": _prompts_case(['{"prompt": "Q:1+2="}', "[1, 2]"]),
    "no_prompt_key": _prompts_case(['{"prompt": "Q:1+2="}', '{"question": "Q:1+2="}']),
    "empty_prompts": _prompts_case([]),
    "prompt_too_long": lambda root, tmp: _flags(root, "--max-prompt-length", "4"),
    "context_too_long": lambda root, tmp: _flags(root, "--max-new-tokens", "200"),
    "unknown_method": lambda root, tmp: _flags(root, "--distill-method", "kd"),
    "unknown_flag": lambda root, tmp: _flags(root, "--lr-schedule", "cosine"),
    "missing_value": lambda root, tmp: _flags(root, "--lr"),
    "flag_combination": lambda root, tmp: _flags(root, "--prefix-source", "offline"),
    "micro_batch": lambda root, tmp: _flags(root, "--max-tokens-per-micro-batch", "20"),
    "missing_checkpoint": lambda root, tmp: _flags(root, "--student-load",
                                                   os.path.join(tmp, "nope")),
    "not_a_checkpoint": lambda root, tmp: _flags(root, "--teacher-load", tmp),
    "unknown_architecture": lambda root, tmp: _flags(
        root, "--teacher-load", "", "--teacher-config",
        _config(os.path.join(tmp, "gpt2.json"), model_type="gpt2",
                architectures=["GPT2LMHeadModel"])),
    "vocab_mismatch": _prepare_vocab_mismatch,
    "tokenizer_mismatch": _prepare_tokenizer_mismatch,
    "tokenizer_too_big": lambda root, tmp: _flags(root, "--tokenizer", _sentencepiece(
        os.path.join(tmp, "big"), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP", vocab_size=44)),
    "tp_kv_heads": lambda root, tmp: _flags(root, "--student-load", "", "--student-config",
                                            _config(os.path.join(tmp, "c.json"),
                                                    num_key_value_heads=1)),
    "pp_layers": lambda root, tmp: _flags(root, "--student-load", "", "--student-config",
                                          _config(os.path.join(tmp, "c.json"),
                                                  num_hidden_layers=3),
                                          "--tensor-model-parallel-size", "1",
                                          "--pipeline-model-parallel-size", "2"),
    "world_size": lambda root, tmp: _flags(root, "--tensor-model-parallel-size", "4"),
    "save_is_file": lambda root, tmp: _flags(root, "--save", os.path.join(
        _write(os.path.join(tmp, "file")), "run")),
    "disk_full": _failing_rng_save(_disk_full),
    "writer_error": _failing_rng_save(_directory_gone),
    **{f"{flag}_{value}": (lambda flag, value: lambda root, tmp: _flags(
        root, f"--{flag.replace('_', '-')}", value))(flag, value)
       for flag, value in (("lr", "nan"), ("lr", "inf"), ("temperature", "nan"),
                           ("clip_grad", "nan"))},
    "adam_beta": lambda root, tmp: _flags(root, "--adam-beta2", "1"),
    "clip_grad_negative": lambda root, tmp: _flags(root, "--clip-grad", "-1"),
    "unknown_verifier": lambda root, tmp: _flags(root, "--verifier", "nope"),
    "parquet_column": lambda root, tmp: _flags(root, "--prompts", _parquet(
        os.path.join(tmp, "prompts.parquet"), [{"prompt": "Q:1+2=", "answer": "3"}]),
        "--prompt-key", "question"),
    "chat_template": lambda root, tmp: _flags(root, "--prompt-template", "chat"),
    "unknown_characters": _prompts_case(['{"prompt": "Q:1+2="}', '{"prompt": "Q:1€2ü="}',
                                         '{"prompt": "Q:2+2="}', '{"prompt": "Q:€="}']),
    "few_prompts": _prompts_case(['{"prompt": "Q:1+2="}'] * 3),
    "resume_method": _resume_case(lambda run: None, "--distill-method", "opd",
                                  "--samples-per-prompt", "1", "--train-iters", "1"),
    "missing_shard": _resume_case(_remove_rank1_model_shard),
    "truncated_shard": _resume_case(_truncate_optimizer_shard),
    "corrupt_metadata": _resume_case(_corrupt_model_metadata),
    "corrupt_rng": _resume_case(_corrupt_rng),
    "corrupt_latest": _resume_case(lambda run: _write(os.path.join(run, "latest"), "half")),
    "latest_missing_dir": _resume_case(lambda run: _write(os.path.join(run, "latest"), "9")),
    "load_without_latest": _prepare_load_without_latest,
    "resume_other_seed": _resume_case(lambda run: None, "--seed", "8"),
    "resume_other_prompts": lambda root, tmp: _flags(
        root, "--save", _saved_run(root, tmp), "--prompts",
        _write(os.path.join(tmp, "three.jsonl"), *['{"prompt": "Q:1+2="}'] * 3)),
    "nan_always": _prepare_nan_always,
    "exit_duration": lambda root, tmp: _flags(root, "--save", os.path.join(tmp, "run"),
                                              "--exit-duration-in-mins", "1e-6", iters=3),
}


def _last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _message_lines(out):
    """A run that goes on or stops cleanly says so on stdout: its warning and stop lines."""
    return tuple(line for line in out.splitlines() if line.startswith(("warning:", "stopped")))


def _bad_input_worker(root, scratch):
    """Every case of PREPARE (plus the read-only --save, the NaN step and the resumed
    schedules) through `train.main`; returns per case (status, the error line or the message
    lines, whether stderr held a traceback, the case's directory, the models built)."""
    from megatron_tropd import run_setup
    from megatron_tropd.checkpoint import checkpointer
    from megatron_tropd.distill import losses

    originals = (losses.compute_loss, checkpointer.torch.save)
    build_model, built = run_setup.build_model, []

    def counted_build(*args, **kwargs):
        built.append(None)
        return build_model(*args, **kwargs)

    run_setup.build_model = counted_build
    results = {}
    for name, prepare in PREPARE.items():
        tmp = os.path.join(scratch, name)
        if _rank0():
            os.makedirs(tmp)
        torch.distributed.barrier()
        try:
            argv = prepare(root, tmp)  # collective: rank 0 writes files, both may train
            torch.distributed.barrier()
            built.clear()
            status, out, err = _main(argv)
        finally:
            losses.compute_loss, checkpointer.torch.save = originals
        line = _last_line(err) if status else _message_lines(out)
        results[name] = (status, line, "Traceback" in err, tmp, len(built))
    run_setup.build_model = build_model
    results["save_read_only"] = _read_only_case(root, os.path.join(scratch, "save_read_only"))
    results["nan_once"] = _nan_once(root, os.path.join(scratch, "nan_once"))
    results.update(_resumed_schedules(root, os.path.join(scratch, "schedule")))
    return results


def _read_only_case(root, tmp):
    run = os.path.join(tmp, "run")
    if _rank0():
        os.makedirs(run)
    with _read_only(run) as why:
        status, _, err = _main(_flags(root, "--save", run))
    # as root the immutable flag gives EPERM; show what a user's read-only directory gives
    return status, _last_line(err).replace(why, os.strerror(errno.EACCES)), "Traceback" in err, tmp


def _nan_once(root, tmp):
    """Three iterations with a NaN loss in the second; a snapshot of weights, Adam state and LR
    schedule after each (through `checkpointer.save`, called every iteration)."""
    import copy

    from megatron_tropd.checkpoint import checkpointer, sharding
    from megatron_tropd.distill import losses

    snapshots = []

    def snapshot(args, student, state):
        snapshots.append((sharding.global_state_dict(student.model, student.arch.vocab_size),
                          copy.deepcopy(student.optimizer.state_dict()),
                          copy.deepcopy(state.scheduler.state_dict())))

    originals = (losses.compute_loss, checkpointer.save)
    losses.compute_loss, checkpointer.save = _nan_loss({2}), snapshot
    try:
        status, out, err = _main(_flags(root, "--save", tmp, "--save-interval", "1", iters=3))
    finally:
        losses.compute_loss, checkpointer.save = originals
    return status, _message_lines(out), "Traceback" in err, tmp, snapshots


def _resumed_schedules(root, tmp):
    """A cosine run of 2 iterations at --lr 1e-3, resumed to 4 iterations at --lr 2e-4, keeping
    the checkpoint's schedule and overriding it: per case (status, message lines, traceback,
    directory, the learning rate after iteration 3)."""
    from megatron_tropd.checkpoint import checkpointer

    run = os.path.join(tmp, "run")
    status, _, err = _main(_flags(root, "--save", run, "--lr-decay-style", "cosine", iters=2))
    assert status == 0, err
    lrs = []

    def lr_after(args, student, state):  # saves nothing: both resumes start from one checkpoint
        lrs.append(student.optimizer.param_groups[0]["lr"])

    save, checkpointer.save = checkpointer.save, lr_after
    results = {}
    try:
        for name, extra in (("resume_lr", ()), ("resume_lr_override",
                                                ("--override-opt-param-scheduler",))):
            lrs.clear()
            status, out, err = _main(_flags(root, "--save", run, "--lr-decay-style", "cosine",
                                            "--lr", "2e-4", "--save-interval", "1", *extra,
                                            iters=4))
            results[name] = (status, _message_lines(out), "Traceback" in err, tmp, lrs[:1])
    finally:
        checkpointer.save = save
    results["resume_train_iters"] = results["resume_lr"]
    return results


@pytest.fixture(scope="module")
def bad_inputs(toy, tmp_path_factory):
    scratch = str(tmp_path_factory.mktemp("bad"))
    return run_distributed(_bad_input_worker, world_size=2, tp=2, args=(toy, scratch))


def _expected(case, root, tmp, **fields):
    return case.message.format(root=root, tmp=tmp, **fields)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.test == "test_bad_input"])
def test_bad_input(bad_inputs, toy, name):
    case = CASES[name]
    for rank, rank_results in enumerate(bad_inputs):  # every rank exits the same way
        _check_case(name, rank, rank_results[name], toy)


def _check_case(name, rank, result, toy):
    """The case's exit status on `rank`, no traceback, and its line: the last of stderr for an
    error (every rank), among the stdout messages of a run that went on (rank 0)."""
    case = CASES[name]
    status, line, traceback, tmp = result[:4]
    assert not traceback and status == case.status
    if status:
        assert line == _expected(case, toy, tmp)
    elif rank == 0:
        assert _expected(case, toy, tmp) in line, line


def test_bad_data_is_reported_before_the_models_are_built(bad_inputs):
    """A malformed prompts file fails before any model is built (minutes at real sizes); a
    problem only a rollout finds comes after both are."""
    for name in ("malformed_json", "not_an_object", "no_prompt_key", "empty_prompts",
                 "prompt_too_long", "chat_template", "parquet_column"):
        assert bad_inputs[0][name][4] == 0, name
    assert bad_inputs[0]["context_too_long"][4] == 2


def test_resume_schedule(bad_inputs, toy):
    """A cosine run of 2 iterations at --lr 1e-3 resumed to 4 at --lr 2e-4: the LR after
    iteration 3 is the cosine over 4 iterations (re-planned to the new --train-iters) from the
    checkpoint's 1e-3, or from 2e-4 with --override-opt-param-scheduler; each says so."""
    cosine = 0.5 * (1 + math.cos(math.pi * 3 / 4))
    for name, max_lr in (("resume_lr", 1e-3), ("resume_lr_override", 2e-4)):
        for rank, rank_results in enumerate(bad_inputs):
            _check_case(name, rank, rank_results[name], toy)
            assert rank_results[name][4] == [pytest.approx(max_lr * cosine, rel=1e-12)]
    for rank, rank_results in enumerate(bad_inputs):
        _check_case("resume_train_iters", rank, rank_results["resume_train_iters"], toy)


def test_failed_save_keeps_the_previous_checkpoint(bad_inputs):
    run = os.path.join(bad_inputs[0]["disk_full"][3], "run")
    assert sorted(os.listdir(run)) == [".lock", "iter_0000001", "latest", "tensorboard"]
    assert open(os.path.join(run, "latest")).read() == "1\n"
    assert sorted(os.listdir(os.path.join(run, "iter_0000001"))) == [
        "config.json", "megatron_tropd.json", "model", "optimizer", "rng"]


def test_nonfinite_step_changes_nothing(bad_inputs, toy):
    """The NaN step leaves weights, Adam moments and step counts, and the LR schedule exactly as
    they were after the step before; the next step trains again."""
    status, lines, traceback, tmp, snapshots = bad_inputs[0]["nan_once"]
    assert not traceback and status == 0
    assert _expected(CASES["nan_once"], toy, tmp) in lines
    (w1, opt1, sched1), (w2, opt2, sched2), (w3, _, sched3) = snapshots
    assert sched2 == sched1 and sched3["num_steps"] == sched1["num_steps"] + 1
    assert all(torch.equal(w2[k], w1[k]) for k in w1)
    assert not all(torch.equal(w3[k], w2[k]) for k in w2)
    assert all(torch.isfinite(w).all() for w in w3.values())
    assert _flat_state(opt2) == _flat_state(opt1)
    assert len(_flat_state(opt1)) > 0


def _flat_state(state, prefix=""):
    """Nested optimizer state as {path: tensor bytes or value}, comparable with ==."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items()
                for k, v in _flat_state(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state)
                for k, v in _flat_state(sub, f"{prefix}/{i}").items()}
    if isinstance(state, torch.Tensor):
        return {prefix: (state.dtype, tuple(state.shape), state.numpy().tobytes())}
    return {prefix: state}


def test_stop_conditions_in_process():
    """A signal sets the flag (the previous handler comes back afterwards); the time limit and the
    exit interval are reasons too. No process group: each rank's own answer."""
    from megatron_tropd.runtime.stopping import StopConditions

    class Args:
        exit_interval, exit_duration_in_mins = 3, 0.0

    before = signal.getsignal(signal.SIGUSR1)
    with StopConditions(Args) as stop:
        assert stop.reason(1) is None and stop.reason(3) == "--exit-interval"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.reason(1) == "SIGUSR1 received"
    assert signal.getsignal(signal.SIGUSR1) is before
    Args.exit_duration_in_mins = 1e-9
    assert StopConditions(Args).reason(1) == "--exit-duration-in-mins 1e-09 reached"


# --- crash and resume under torchrun --------------------------------------------------------------

ITERS, SAVE_INTERVAL = 8, 2
LOG_LINE = re.compile(r"^iteration\s+(\d+)/")


def _torchrun(root, save, logs, *extra, fault=None, ignore_usr1=False):
    """torchrun with two ranks (TP=2) training the toy problem, in a session of its own; stdout and
    stderr go to files in `logs` (a pipe could be held open by an orphan, see `_finish`)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TROPD_TEST_LAUNCH=str(logs))
    env.pop("TROPD_FAULT", None)
    if fault:
        env["TROPD_FAULT"] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_tropd.train",
               *_flags(root, "--save", save, "--save-interval", str(SAVE_INTERVAL),
                       "--log-interval", "1", *extra, iters=ITERS)]
    if ignore_usr1:  # what docs/RELIABILITY.md tells SLURM users to do
        command = ["bash", "-c", "trap '' USR1; exec \"$@\"", "bash", *command]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(logs / "out.txt", "w"),
                            stderr=open(logs / "err.txt", "w"), start_new_session=True)
    proc.logs = logs
    return proc


def _finish(proc, timeout=600):
    """(exit status, stdout, stderr) once `proc` has ended. A SIGKILLed worker can leave behind
    the writer process megatron-core's dist_checkpointing spawned (a cluster's job cleanup kills
    it); the test kills what is left of its launch."""
    try:
        status = proc.wait(timeout=timeout)
    finally:
        for pid in _launched_by(proc.logs):
            os.kill(pid, signal.SIGKILL)
    return status, (proc.logs / "out.txt").read_text(), (proc.logs / "err.txt").read_text()


def _launched_by(logs):
    """Processes still running with this launch's TROPD_TEST_LAUNCH marker."""
    marker = f"TROPD_TEST_LAUNCH={logs}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                pids.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _latest(save):
    path = os.path.join(save, "latest")
    return int(open(path).read()) if os.path.exists(path) else 0


def _resumed_lines(out):
    return re.findall(r"^resumed from .*$", out, re.M)


def _workers(torchrun_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True,
                              text=True).stdout.split():
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = int(pid)
    return out


def _signal_run(root, save, logs):
    """Start a run, wait for its first logged iteration, then SIGUSR1 to torchrun (ignored) and
    SIGTERM to rank 1 only: every rank must stop at the same iteration, after saving."""
    # no interval saves: the checkpoint at the stop is the signal's doing
    proc = _torchrun(root, save, logs, "--save-interval", "0", ignore_usr1=True)

    def logged():
        return [int(m.group(1)) for m in map(LOG_LINE.match,
                                              (logs / "out.txt").read_text().splitlines()) if m]

    before, rank1 = [], None
    while not before and proc.poll() is None:
        time.sleep(0.1)
        rank1 = rank1 or _workers(proc.pid).get(1)  # known before the first iteration ends
        before = logged()
    assert before and rank1, "the run logged no iteration"
    os.kill(proc.pid, signal.SIGUSR1)
    os.kill(rank1, signal.SIGTERM)
    # the signal came after the iteration first seen and before the one after the last seen now
    return (before[0], max(logged())) + _finish(proc)


def _tensorboard_scalars(save):
    """{tag: [(step, value)]} of the train/ scalars, as TensorBoard shows them (events of
    iterations re-done after a resume replace the earlier ones)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(save, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag.startswith("train/")}


def _checkpoint_tensors(directory):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = {}
    for part in ("model", "optimizer"):
        path = os.path.join(directory, f"{part}.pt")
        dcp_to_torch_save(os.path.join(directory, part), path)
        state = torch.load(path, weights_only=False)
        os.remove(path)
        out.update({f"{part}/{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def _kill_iteration(rng, phase, start):
    """A pseudo-random iteration to die in, after the first checkpoint past `start` (so every
    resume has work to redo) and early enough to leave iterations for the SIGTERM run."""
    if phase == "rollout":
        return start + rng.randint(SAVE_INTERVAL + 1, 2 * SAVE_INTERVAL)
    if phase == "optimizer":
        return start + rng.randint(1, SAVE_INTERVAL)
    if phase == "save":
        return start + SAVE_INTERVAL * rng.randint(1, 2)
    return start + SAVE_INTERVAL  # commit


def test_killed_and_signalled_runs_resume_bit_exact(toy, tmp_path):
    """One uninterrupted run; one that is SIGKILLed in a rollout, between the optimiser and LR
    steps, in the middle of a checkpoint write and between a checkpoint and `latest` (iterations
    drawn by a seeded RNG), stopped by SIGTERM, and finished: the same final weights, optimiser
    state and TensorBoard metrics (each iteration once), and `latest` always at the last
    complete checkpoint."""
    launches = itertools.count()

    def logs():
        path = tmp_path / f"launch{next(launches)}"
        path.mkdir()
        return path

    reference = str(tmp_path / "reference")
    status, _, err = _finish(_torchrun(toy, reference, logs()))
    assert status == 0, err[-3000:]

    save = str(tmp_path / "crashed")
    rng = random.Random(2024)
    start, killed_at, previous = 0, {}, None

    def check_resumed(out):
        """The launch after a kill names the checkpoint it resumed from (the previous kill's
        row of the table)."""
        expected = [] if previous is None else [_expected(
            CRASH_CASES[f"sigkill_{previous}"], toy, tmp_path, save=save, resumed=start)]
        assert _resumed_lines(out) == expected

    for phase in ("rollout", "optimizer", "save", "commit"):
        iteration = _kill_iteration(rng, phase, start)
        status, out, err = _finish(_torchrun(toy, save, logs(), fault=f"{phase}:{iteration}"))
        assert status != 0 and "Signal 9 (SIGKILL)" in err, (phase, status, err[-3000:])
        assert os.path.exists(os.path.join(save, ".lock"))  # left behind; must not block
        check_resumed(out)
        # the kill came before this iteration's checkpoint reached `latest`
        assert _latest(save) == (iteration - 1) // SAVE_INTERVAL * SAVE_INTERVAL, phase
        if phase == "commit":  # complete but not named by `latest`: redone and replaced later
            assert os.path.isdir(os.path.join(save, f"iter_{iteration:07d}"))
        killed_at[phase], previous, start = iteration, phase, _latest(save)

    logged, seen, status, out, err = _signal_run(toy, save, logs())
    assert status == 0, err[-3000:]
    check_resumed(out)
    stop = _latest(save)
    assert logged <= stop <= seen + 1 and stop < ITERS, (killed_at, logged, seen, stop)
    lines = out.splitlines()
    assert _expected(CRASH_CASES["sigterm"], toy, tmp_path, stop=stop) in lines
    assert f"done: {stop} iterations" in lines

    status, out, err = _finish(_torchrun(toy, save, logs()))
    assert status == 0, err[-3000:]
    assert _resumed_lines(out) == [f"resumed from {save}/iter_{stop:07d} at iteration {stop}"]
    assert not [name for name in os.listdir(save) if name.endswith(".partial")]

    ref_scalars, scalars = _tensorboard_scalars(reference), _tensorboard_scalars(save)
    assert set(scalars) == set(ref_scalars) and "train/loss" in scalars
    for tag, values in ref_scalars.items():
        assert [step for step, _ in values] == list(range(1, ITERS + 1)), tag
        assert scalars[tag] == values, tag
    ref_tensors = _checkpoint_tensors(os.path.join(reference, f"iter_{ITERS:07d}"))
    tensors = _checkpoint_tensors(os.path.join(save, f"iter_{ITERS:07d}"))
    assert set(tensors) == set(ref_tensors) and any(k.startswith("optimizer/") for k in tensors)
    for name, tensor in ref_tensors.items():
        assert torch.equal(tensors[name], tensor), name


# --- runs side by side ----------------------------------------------------------------------------


def _single_process(root, logs, *extra, env=None, iters=2):
    """`python -m megatron_tropd.train` on the toy problem (TP=1), no torchrun; output to files
    in `logs`."""
    logs.mkdir()
    environment = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in (env or {}):
            environment.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_tropd.train",
                             *toy_setup.train_args(root, *extra, iters=iters)],
                            env=environment, cwd=ROOT, stdout=open(logs / "out.txt", "w"),
                            stderr=open(logs / "err.txt", "w"))
    proc.logs = logs
    return proc


def _ended(proc, timeout=600):
    status = proc.wait(timeout=timeout)
    return status, (proc.logs / "out.txt").read_text(), (proc.logs / "err.txt").read_text()


def test_concurrent_runs(toy, tmp_path):
    """A run owns its --save: a second run on it (started while the first trains) refuses at
    once, naming the owner, and the first, stopped by SIGTERM once the others are done, saves and
    leaves every checkpoint intact. Meanwhile a third single-process run on its own --save trains
    side by side (no port to collide on), and a launch whose MASTER_PORT is taken says so in one
    line. (The first is given far more iterations than it gets to run, so it is still training
    however slowly the others start on a loaded machine.)"""
    import signal
    import socket

    save = tmp_path / "shared"
    first = _single_process(toy, tmp_path / "first", "--save", str(save), "--save-interval",
                            "10", "--keep-last", "0", iters=100000)
    lock = save / ".lock"
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline and not (
            lock.exists() and f"pid {first.pid} " in lock.read_text()):
        time.sleep(0.1)
    assert first.poll() is None, _ended(first)[2][-3000:]

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    second = _single_process(toy, tmp_path / "second", "--save", str(save))
    beside = _single_process(toy, tmp_path / "beside", "--save", str(tmp_path / "own"))
    rendezvous = _single_process(toy, tmp_path / "port", env=dict(
        WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    fields = dict(save=save, pid=first.pid, host=socket.gethostname(), port=port)

    status, _, err = _ended(second)
    assert first.poll() is None, "the first run ended before the second was refused"
    case = CONCURRENT_CASES["save_in_use"]
    assert "Traceback" not in err and status == case.status
    assert _last_line(err) == case.message.format(**fields)

    status, out, err = _ended(rendezvous)
    taken.close()
    case = CONCURRENT_CASES["port_in_use"]
    assert "Traceback" not in err and status == case.status
    assert _last_line(err) == case.message.format(**fields)

    status, out, err = _ended(beside)
    assert status == 0, err[-3000:]
    assert _last_line(out) == CONCURRENT_CASES["two_single_process_runs"].message

    assert first.poll() is None, "the first run ended before the others did"
    first.send_signal(signal.SIGTERM)
    status, out, err = _ended(first)
    assert status == 0, err[-3000:]
    done = re.fullmatch(r"done: (\d+) iterations", _last_line(out))
    assert done, _last_line(out)
    last = int(done[1])
    checkpoints = sorted({f"iter_{i:07d}" for i in (*range(10, last + 1, 10), last)})
    assert sorted(os.listdir(save)) == [".lock", *checkpoints, "latest", "tensorboard"]
    assert (save / "latest").read_text() == f"{last}\n"
    for name in checkpoints:
        assert sorted(os.listdir(save / name)) == [
            "config.json", "megatron_tropd.json", "model", "optimizer", "rng"]
        meta = json.loads((save / name / "megatron_tropd.json").read_text())
        assert meta["iteration"] == int(name[5:])


# --- megatron-core's writer processes ------------------------------------------------------------

_SLOW_SAVE = """
import os, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
import toy_setup
from megatron_tropd.runtime.initialize import initialize_distributed
from megatron_tropd.models.builder import build_model
from megatron_tropd.checkpoint.model_dir import save_model

def hold(*args, **kwargs):  # a shard write that takes its time: the kill comes in the middle
    open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
    time.sleep(300)

if __name__ == "__main__":  # spawned helpers import this file
    FileSystemWriterAsync.write_preloaded_data = staticmethod(hold)
    initialize_distributed()
    save_model(sys.argv[1], build_model(toy_setup.STUDENT, "student"), toy_setup.STUDENT)
"""


def _descendants(pid):
    """Every process below `pid` now."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))

    def below(parent):
        return [p for child in children.get(parent, []) for p in (child, *below(child))]
    return below(pid)


def _alive(pid) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its reaper collects it later


def test_writer_processes_die_with_their_parent(tmp_path):
    """SIGKILL of a process in the middle of a checkpoint write (the model save the trainer and
    the converter share): megatron-core's writer processes (its results-queue Manager; on 0.16
    the forked shard writers too) are gone within seconds, not left holding the output."""
    script, pids = tmp_path / "slow_save.py", tmp_path / "pids"
    script.write_text(_SLOW_SAVE)
    pids.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(pids)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.listdir(pids) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.listdir(pids), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ""
    writers = _descendants(proc.pid)
    assert writers, "the save started no helper process"
    proc.kill()
    proc.wait()
    deadline = time.time() + 15
    while any(map(_alive, writers)) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in writers if _alive(p)]
    for pid in alive:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"writer processes alive 15 s after their parent was killed: {alive}"


# --- the table ------------------------------------------------------------------------------------


def table() -> str:
    """The bad-input table of docs/RELIABILITY.md, from CASES and CRASH_CASES."""
    rows = ["| bad input | what the user sees (last line) | exit | test |", "|---|---|---|---|"]
    fields = dict(root="<toy>", tmp="<tmp>", save="<save>", stop="S", resumed="R")
    fields.update(pid="P", host="H", port="PORT")
    for name, case in {**CASES, **CRASH_CASES, **CONCURRENT_CASES}.items():
        message = case.message.replace("{resumed:07d}", "{resumed}").format(**fields)
        status = "SIGKILL" if case.status == -9 else str(case.status)
        test = case.test + (f"[{name}]" if case.test == "test_bad_input" else "")
        rows.append(f"| {case.bad_input} | `{message}` | {status} | `{test}` |")
    return "\n".join(rows) + "\n"


def test_documented_table_is_current():
    text = open(DOC).read()
    assert table() in text, "docs/RELIABILITY.md is stale: python tests/test_reliability.py"


if __name__ == "__main__":
    sys.stdout.write(table())
