"""Evaluation: the pass@k estimator, and greedy pass@1 of the embedded toy student checked against
Hugging Face transformers decoding the same HF checkpoint."""

import os

import pytest

from megatron_tropd.evaluate import pass_at_k
from megatron_tropd.testing import run_distributed

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
                              p.prompt) for i, p in enumerate(_problems(n))]
    return evaluate(model, tokenizer, examples, arch.vocab_size, max_new_tokens=64,
                    pass_k=(1, 2), samples=2, batch_size=8)


def test_greedy_pass_at_1_matches_transformers():
    import torch
    import transformers

    from megatron_tropd.tasks.verifier import verify
    from megatron_tropd.tokenizer import load_tokenizer, prompt_ids

    n = 24
    ours = run_distributed(_megatron_outcomes, world_size=1, args=(n,))[0]
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
