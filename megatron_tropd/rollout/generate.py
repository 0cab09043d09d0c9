"""Batched generation inside the training processes, on this rank's megatron-core model stage.

Prompts of different lengths are left-padded (layout in `rollout.batch`); each step samples one
token per row from the vocabulary-sharded logits of the last pipeline stage through
`ops.vocab_parallel.sample` (no logits are gathered), with a KV cache (`rollout.kv_cache`) or,
for reference, megatron's own forward of the whole sequence at every step.

Random draws are keyed by (seed, global sample index, response position), so the same prompts give
the same samples at any tensor-, pipeline- or data-parallel layout. Works for the student and, for
online teacher responses, the frozen teacher alike.

    batch = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=512,
                                                    stop_ids=(eos,), n_samples=4), vocab_size)
"""

import contextlib
import dataclasses
from typing import Optional, Sequence, Tuple

import torch

from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.rollout.batch import RolloutBatch, causal_padding_mask
from megatron_tropd.rollout.kv_cache import KVCache
from megatron_tropd.rollout.stage import GenerationStage


class GenerationError(ValueError):
    """Generation inputs that cannot work (prompt longer than the context, ...): one-line message."""


@dataclasses.dataclass
class SamplingParams:
    """How to sample.

    Args:
        temperature: softmax temperature; 0 is greedy (argmax).
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest most likely set of probability >= top_p (1.0 = all).
        max_new_tokens: most tokens sampled per row in one call (a teacher prefix not included).
        stop_ids: ids that end a row (EOS and any other stop token); the stop id itself is part of
            the response, nothing after it is.
        n_samples: samples per prompt (rows `i * n_samples ... (i + 1) * n_samples - 1`).
        seed: seed of the sampling noise.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_ids: Tuple[int, ...] = ()
    n_samples: int = 1
    seed: int = 0

    def __post_init__(self):
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n_samples < 1:
            raise GenerationError(f"n_samples must be >= 1, got {self.n_samples}")


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    vocab_size: int,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    sample_offset: int = 0,
    pad_id: int = 0,
    use_kv_cache: bool = True,
    record_entropy: bool = False,
) -> RolloutBatch:
    """Sample `params.n_samples` continuations of every prompt (collective over the
    model-parallel group: every rank passes the same prompts and gets the same batch).

    Args:
        model: this rank's GPTModel stage (student, or teacher for online teacher responses).
        prompts: token ids per prompt, of any lengths.
        vocab_size: the true vocabulary (the logits' padded columns are never sampled).
        prefixes: per prompt, teacher-response tokens the model continues from (off-policy
            guidance); they are recorded as `prefix_mask`, not as the student's tokens. An empty
            prefix is an on-policy row; a prefix ending in a stop id leaves nothing to sample.
        sample_offset: global index of this call's first sample, so that sampling does not depend
            on how prompts are split over data-parallel ranks (prompt index * n_samples).
        pad_id: id written at padded columns (masked everywhere).
        use_kv_cache: False recomputes the whole sequence at every step (the reference the KV
            cache is tested against).
        record_entropy: also record the sampling distribution's entropy per student token
            (`student_entropy`; an extra pass over the vocabulary shard per step), else zeros.
    """
    contexts, prompt_lengths, prefix_lengths = _rows(prompts, prefixes, params.n_samples)
    _check(contexts, params, vocab_size, model.max_sequence_length)
    device = next(model.parameters()).device
    n_rows, width = len(contexts), max(len(c) for c in contexts)
    max_length = width + params.max_new_tokens
    tokens, padding = _left_padded(contexts, width, max_length, pad_id, device)
    prompt_lengths, prefix_lengths = prompt_lengths.to(device), prefix_lengths.to(device)
    student_mask = torch.zeros((n_rows, max_length), dtype=torch.bool, device=device)
    lp_S_old = torch.zeros((n_rows, max_length), dtype=torch.float32, device=device)
    student_entropy = torch.zeros_like(lp_S_old)
    sample_ids = torch.arange(sample_offset, sample_offset + n_rows, device=device)
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    # A teacher prefix that ends in a stop id leaves the row nothing to sample.
    done = (prefix_lengths > 0) & torch.isin(tokens[:, width - 1], stop_ids)

    # The sampler's draw of every row and step, made once, keyed by (seed, sample id, response
    # position).
    uniforms = (vp.uniform_from_keys(vp.sampling_keys(
        params.seed, sample_ids[:, None],
        prefix_lengths[:, None] + torch.arange(params.max_new_tokens, device=device)))
        if params.temperature > 0 else None)

    stage = GenerationStage(model, max_length, n_rows)
    kv_cache = KVCache(model, n_rows, max_length, stage.rope) if use_kv_cache else None
    fast_path = _without_cuda_to_cpu_mode() if kv_cache is not None else contextlib.nullcontext()
    steps = 0
    with _eval_mode(model), torch.inference_mode(), fast_path:
        while steps < params.max_new_tokens and not done.all():
            column = width + steps
            start = kv_cache.position if kv_cache is not None else 0
            mask = causal_padding_mask(padding, start, column - start)
            logits = stage.forward(tokens[:, start:column], mask, kv_cache)
            ids = torch.empty(n_rows, dtype=torch.long, device=device)
            if stage.is_last:
                ids = vp.sample(logits, vocab_size, None if uniforms is None else uniforms[:, steps],
                                params.temperature, params.top_k, params.top_p)
                if record_entropy:
                    lp_S_old[:, column], student_entropy[:, column] = (
                        vp.token_log_probs_and_entropy(logits, ids, vocab_size))
                else:
                    lp_S_old[:, column] = vp.token_log_probs(logits, ids, vocab_size)
            stage.broadcast_from_last(ids)
            tokens[:, column] = ids.masked_fill(done, pad_id)
            student_mask[:, column] = ~done
            done |= torch.isin(ids, stop_ids)
            steps += 1
    length = width + steps
    # Only the last stage computed the sampler's statistics; rows stopped earlier hold none.
    stats = stage.broadcast_from_last(
        torch.stack([lp_S_old[:, width:length], student_entropy[:, width:length]]).contiguous())
    untrained = ~student_mask[:, width:length]
    lp_S_old[:, width:length] = stats[0].masked_fill(untrained, 0.0)
    student_entropy[:, width:length] = stats[1].masked_fill(untrained, 0.0)
    return RolloutBatch(
        tokens=tokens[:, :length].clone(),
        prompt_lengths=prompt_lengths,
        prefix_lengths=prefix_lengths,
        context_width=width,
        student_mask=student_mask[:, :length].clone(),
        lp_S_old=lp_S_old[:, :length].clone(),
        student_entropy=student_entropy[:, :length].clone(),
        sample_ids=sample_ids,
    )


def _rows(prompts, prefixes, n_samples):
    """Contexts (prompt + prefix) of every sample row, with their prompt and prefix lengths."""
    if len(prompts) == 0:
        raise GenerationError("no prompts to generate from")
    if prefixes is None:
        prefixes = [()] * len(prompts)
    if len(prefixes) != len(prompts):
        raise GenerationError(f"{len(prefixes)} teacher prefixes for {len(prompts)} prompts")
    contexts, prompt_lengths, prefix_lengths = [], [], []
    for i, (prompt, prefix) in enumerate(zip(prompts, prefixes)):
        prompt, prefix = [int(t) for t in prompt], [int(t) for t in prefix]
        if not prompt:
            raise GenerationError(f"prompt {i} is empty")
        contexts += [prompt + prefix] * n_samples
        prompt_lengths += [len(prompt)] * n_samples
        prefix_lengths += [len(prefix)] * n_samples
    return contexts, torch.tensor(prompt_lengths), torch.tensor(prefix_lengths)


def _left_padded(contexts, width, max_length, pad_id, device):
    """Token buffer `[B, max_length]` with each context ending at column `width`, and the mask of
    its left padding."""
    tokens = torch.full((len(contexts), max_length), pad_id, dtype=torch.long)
    padding = torch.zeros((len(contexts), max_length), dtype=torch.bool)
    for row, context in enumerate(contexts):
        tokens[row, width - len(context):width] = torch.tensor(context, dtype=torch.long)
        padding[row, :width - len(context)] = True
    return tokens.to(device), padding.to(device)


def _check(contexts, params, vocab_size, max_sequence_length):
    longest = max(range(len(contexts)), key=lambda r: len(contexts[r]))
    if len(contexts[longest]) + params.max_new_tokens > max_sequence_length:
        raise GenerationError(
            f"row {longest}: context of {len(contexts[longest])} tokens + max_new_tokens "
            f"{params.max_new_tokens} exceeds the model's maximum sequence length "
            f"{max_sequence_length}"
        )
    ids = [t for c in contexts for t in c]
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise GenerationError(
            f"token ids must lie in [0, {vocab_size}), got ids from {min(ids)} to {max(ids)}"
        )


def _without_cuda_to_cpu_mode():
    """On a CPU host, generation with the KV cache runs without the CPU compatibility layer's
    TorchFunctionMode, which sends every torch call through Python (about 11% of a decode step of
    the benchmark model). That path allocates nothing on a CUDA device (the KV cache is built
    outside it; megatron's core attention, which takes a buffer on the current CUDA device, is not
    called), so the mode has nothing to do there; a megatron-core change that did allocate would
    fail loudly ("Torch not compiled with CUDA"), not silently. megatron's full forward (no KV
    cache) keeps the mode."""
    from megatron_tropd import cpu_compat

    return torch._C.DisableTorchFunction() if cpu_compat.is_enabled() else contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(model):
    """Generation is inference (no dropout); the model is given back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
