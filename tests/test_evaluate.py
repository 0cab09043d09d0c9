"""Evaluation: the pass@k estimator, and greedy pass@1 of the embedded toy student checked against
Hugging Face transformers decoding the same HF checkpoint."""

import os

import pytest

from megatron_tropd.evaluate import pass_at_k
from megatron_tropd.runtime.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = os.path.join(ROOT, "examples", "toy", "student")


def test_pass_at_k_matches_direct_count():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # c=1 of n=4, k=2: the pairs holding the correct sample are 3 of C(4, 2) = 6
    assert pass_at_k(4, 1, 2) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(2, 1, 4)


def _problems(n):
    from megatron_tropd.tasks.splits import heldout_problems

    return heldout_problems(n)


def _megatron_outcomes(n):
    from megatron_tropd.data import PromptExample
    from megatron_tropd.evaluate import evaluate, load_for_eval
    from megatron_tropd.tokenizer import prompt_ids

    arch, model, tokenizer = load_for_eval(STUDENT)
    examples = [PromptExample(i, prompt_ids(tokenizer, p.prompt, template="plain"), p.answer,
                              p.prompt, source=("short" if i % 3 else "long"))
                for i, p in enumerate(_problems(n))]
    responses = []
    result = evaluate(model, tokenizer, examples, arch.vocab_size, max_new_tokens=64,
                      pass_k=(1, 2), samples=2, batch_size=8, responses_out=responses)
    return result, responses


N_PROBLEMS = 24


@pytest.fixture(scope="module")
def megatron_run():
    """The toy student's evaluation of the first N_PROBLEMS held-out problems, in one spawn
    shared by the tests that read it: (figures, greedy responses)."""
    return run_distributed(_megatron_outcomes, world_size=1, args=(N_PROBLEMS,))[0]


def test_greedy_pass_at_1_matches_transformers(megatron_run):
    import torch
    import transformers

    from megatron_tropd.tasks.verifier import verify
    from megatron_tropd.tokenizer import load_tokenizer, prompt_ids

    n = N_PROBLEMS
    ours, _ = megatron_run
    tokenizer = load_tokenizer(STUDENT)
    model = transformers.AutoModelForCausalLM.from_pretrained(STUDENT).eval()
    outcomes = []
    for problem in _problems(n):
        ids = torch.tensor([prompt_ids(tokenizer, problem.prompt, template="plain")])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        outcomes.append(verify(tokenizer.decode(out[0, ids.shape[1]:].tolist()), problem.answer))
    assert ours["greedy"] == {o: outcomes.count(o) for o in ("correct", "wrong", "malformed")}
    assert ours["pass@1"] == outcomes.count("correct") / n
    assert 0.0 <= ours["sampled_pass@1"] <= ours["sampled_pass@2"] <= 1.0
    assert ours["avg@2"] == pytest.approx(ours["sampled_pass@1"])  # both the mean of c / n
    assert set(ours["by_source"]) == {"short", "long"}
    assert sum(r["problems"] for r in ours["by_source"].values()) == n
    assert 0 < ours["mean_length"] <= 64 and 0.0 <= ours["truncated"] <= 1.0


def test_scoring_a_responses_file_matches_the_model_run(megatron_run, tmp_path, monkeypatch):
    """The greedy responses of a model run, written as --save-responses writes them, scored by
    `evaluate --responses` without a model: the same counts; and with an index into --data
    instead of answers."""
    import json

    from megatron_tropd import evaluate

    result, responses = megatron_run
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in responses))

    def no_model(*args, **kwargs):
        raise AssertionError("--responses loaded a model")

    monkeypatch.setattr(evaluate, "load_for_eval", no_model)
    out = tmp_path / "scored.json"
    evaluate.main(["--responses", str(path), "--verifier", "addition", "--label", "file",
                   "--output", str(out)])
    scored = json.loads(out.read_text())["file"]
    assert (scored["greedy"], scored["pass@1"]) == (result["greedy"], result["pass@1"])
    assert {s: r["greedy"] for s, r in scored["by_source"].items()} == {
        s: r["greedy"] for s, r in result["by_source"].items()}

    # rows holding only the prompt index: the answers come from the prompts file
    from megatron_tropd.tasks.splits import heldout_problems

    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n"
                            for p in heldout_problems(N_PROBLEMS)))
    by_index = tmp_path / "by_index.jsonl"
    by_index.write_text("".join(json.dumps({"index": r["index"], "response": r["response"]})
                                + "\n" for r in responses))
    evaluate.main(["--responses", str(by_index), "--data", str(data), "--tokenizer", STUDENT,
                   "--prompt-template", "plain", "--label", "file", "--output", str(out)])
    assert json.loads(out.read_text())["file"]["greedy"] == result["greedy"]


def test_summary_figures_by_hand():
    """pass@1, pass@k, avg@n and lengths of hand-made outcomes, overall and per source."""
    from megatron_tropd.evaluate import Scored, summarize

    c, w, m = "correct", "wrong", "malformed"
    scored = [
        {"source": "aime", "greedy": Scored(c, 10, False),
         "samples": [Scored(c, 4, False), Scored(w, 8, True), Scored(w, 6, False),
                     Scored(m, 8, True)]},
        {"source": "amc", "greedy": Scored(m, 8, True),
         "samples": [Scored(w, 2, False)] * 3 + [Scored(c, 2, False)]},
        {"source": "amc", "greedy": Scored(w, 6, False), "samples": [Scored(w, 1, False)] * 4},
    ]
    result = summarize(scored, pass_k=(1, 2))
    assert result["greedy"] == {c: 1, w: 1, m: 1} and result["pass@1"] == pytest.approx(1 / 3)
    assert result["avg@4"] == pytest.approx((1 + 1 + 0) / 12)
    # pass@2 with 1 correct of 4: 1 - C(3, 2) / C(4, 2) = 1/2, for two problems of three
    assert result["sampled_pass@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert result["mean_length"] == pytest.approx(8) and result["truncated"] == pytest.approx(1 / 3)
    assert result["sampled_mean_length"] == pytest.approx((4 + 8 + 6 + 8 + 2 * 4 + 4) / 12)
    assert result["sampled_truncated"] == pytest.approx(2 / 12)
    assert result["by_source"]["amc"]["greedy"] == {c: 0, w: 1, m: 1}
    assert result["by_source"]["aime"]["avg@4"] == pytest.approx(1 / 4)


def test_evaluate_one_line_errors(tmp_path, capsys):
    from megatron_tropd import evaluate

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "A: 3"}\n')
    for argv, message in (
            ([], "give --load (generate and score) or --responses (score a file)"),
            (["--responses", str(bad), "--verifier", "nope"], "unknown verifier 'nope'"),
            (["--responses", str(bad)], f"{bad}:1: no 'answer' (and no 'index' into --data)")):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def _evaluate_command(argv):
    from megatron_tropd import evaluate

    evaluate.main(argv)


def test_save_responses_writes_the_greedy_responses(megatron_run, tmp_path):
    """`python -m megatron_tropd.evaluate --save-responses FILE`: the file holds the greedy
    responses of the same run made through `evaluate.evaluate`, in problem order."""
    import json

    from megatron_tropd.tasks.splits import heldout_problems

    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n"
                            for p in heldout_problems(N_PROBLEMS)))
    saved, output = tmp_path / "responses.jsonl", tmp_path / "result.json"
    run_distributed(_evaluate_command, world_size=1, args=([
        "--load", STUDENT, "--data", str(data), "--prompt-template", "plain",
        "--max-new-tokens", "64", "--batch-size", "8", "--save-responses", str(saved),
        "--output", str(output)],))
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["response"] for r in rows] == [r["response"] for r in megatron_run[1]]
    assert json.loads(output.read_text())[STUDENT]["greedy"] == megatron_run[0]["greedy"]
