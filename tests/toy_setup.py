"""A tiny distillation problem for trainer tests, made in a directory: a character-level
SentencePiece tokenizer, prompt files and randomly initialised student and teacher checkpoints (the
teacher's output layer scaled up, so its distributions are peaked and there is something to learn).
"""

import json
import os
import random

from megatron_tropd.models.arch import ModelArch

STUDENT = ModelArch(family="llama", vocab_size=32, hidden_size=32, ffn_hidden_size=64,
                    num_layers=2, num_attention_heads=4, num_query_groups=2,
                    max_position_embeddings=128)
TEACHER = ModelArch(family="qwen3", vocab_size=32, hidden_size=64, ffn_hidden_size=128,
                    num_layers=2, num_attention_heads=4, num_query_groups=2,
                    max_position_embeddings=128)
TEACHER_LOGIT_SCALE = 10.0  # random init logits are nearly uniform; this makes them peaked


def _problem(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Q:{a}+{b}=", str(a + b)


def make_text_files(root: str, n_train: int = 32, n_heldout: int = 8):
    """Tokenizer (char SentencePiece), train/held-out prompts, SFT data and teacher responses."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [_problem(rng) for _ in range(400)]
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as f:
        f.writelines(f"{q}{a}$\n" for q, a in lines)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(root, "tok"),
                                   vocab_size=24, model_type="char", character_coverage=1.0,
                                   pad_id=3, hard_vocab_limit=False, minloglevel=2)
    for name, chunk in (("prompts", lines[:n_train]), ("heldout", lines[n_train:n_train + n_heldout])):
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in chunk)
    with open(os.path.join(root, "sft.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in lines[:n_train])
    return os.path.join(root, "tok.model")


def make_checkpoints(root: str, teacher_logit_scale: float = TEACHER_LOGIT_SCALE):
    """Runs in a spawned TP=1 process: random student and teacher saved as model checkpoints."""
    import torch

    from megatron_tropd.checkpoint.model_dir import save_model
    from megatron_tropd.models.builder import build_model

    torch.manual_seed(0)
    student = build_model(STUDENT, "student")
    teacher = build_model(TEACHER, "teacher")
    with torch.no_grad():
        teacher.output_layer.weight.mul_(teacher_logit_scale)
    save_model(os.path.join(root, "student"), student, STUDENT)
    save_model(os.path.join(root, "teacher"), teacher, TEACHER)


def make_toy(root: str) -> str:
    """The whole toy problem in `root` (checkpoints made in a spawned process); returns `root`."""
    from megatron_tropd.runtime.testing import run_distributed

    make_text_files(root)
    run_distributed(make_checkpoints, world_size=1, args=(root,))
    return root


def train_args(root: str, *extra: str, iters: int = 3, method: str = "tropd"):
    """Trainer flags for the toy problem; `extra` overrides or adds."""
    return [
        "--student-load", os.path.join(root, "student"),
        "--teacher-load", os.path.join(root, "teacher"),
        "--tokenizer", os.path.join(root, "tok.model"),
        "--prompts", os.path.join(root, "prompts.jsonl"),
        "--distill-method", method, "--train-iters", str(iters),
        "--prompts-per-iteration", "4", "--samples-per-prompt", "2", "--micro-batch-size", "4",
        "--max-new-tokens", "8", "--lr", "1e-3", "--teacher-topk", "16", "--eopd-topk", "8",
        "--prompt-template", "plain", "--max-prompt-length", "16", "--log-interval", "100",
        "--seed", "7", *extra,
    ]
