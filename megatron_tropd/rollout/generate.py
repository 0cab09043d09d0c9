"""Generation inside the training processes, on this rank's megatron-core model stage.

Every row starts at column 0 (layout in `megatron_tropd.tokens`); each step samples one token per
row from the vocabulary-sharded logits of the last pipeline stage through `ops.vocab_parallel.sample`
(no logits are gathered). Rows are decoded with a KV cache through at most `rollout_batch_size`
slots with continuous batching and shared prompt prefill (`rollout.engine`), or, for reference,
all at once with megatron's own forward of every whole sequence at every step.

Random draws are keyed by (seed, global sample index, response position), so the same prompts give
the same samples at any tensor-, pipeline- or data-parallel layout and any rollout batch size.
Works for the student and, for online teacher responses, the frozen teacher alike.

    batch = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=512,
                                                    stop_ids=(eos,), n_samples=4), vocab_size,
                     rollout_batch_size=32)
"""

import contextlib
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_tropd.errors import UserError
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
from megatron_tropd.ops.sampling import sample
from megatron_tropd.rollout.batch import RolloutBatch
from megatron_tropd.rollout.engine import Engine, Row, Sampled
from megatron_tropd.rollout.stage import GenerationStage
from megatron_tropd.runtime.cpu_compat import cuda_to_cpu
from megatron_tropd.tokens import TokenRecord


class GenerationError(UserError):
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
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n_samples < 1:
            raise GenerationError(f"n_samples must be >= 1, got {self.n_samples}")


def check_sampling(temperature: float, top_k: int, top_p: float):
    """The one check of the sampling settings (`SamplingParams`, the trainer's flags): a
    `GenerationError` naming the first bad one."""
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0, got {top_k}")


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    vocab_size: int,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    sample_offset: int = 0,
    use_kv_cache: bool = True,
    record_entropy: bool = False,
    rollout_batch_size: Optional[int] = None,
    max_prefill_tokens: Optional[int] = None,
) -> RolloutBatch:
    """Sample `params.n_samples` continuations of every prompt (collective over the
    model-parallel group: every rank passes the same prompts and gets the same batch).

    Args:
        model: this rank's GPTModel stage (student, or teacher for online teacher responses).
        prompts: token ids per prompt, of any lengths.
        vocab_size: the true vocabulary (the logits' padded columns are never sampled).
        prefixes: per prompt, teacher-response tokens the model continues from (off-policy
            guidance); they are recorded as prefix tokens, not as the student's. An empty prefix
            is an on-policy row; a prefix ending in a stop id leaves nothing to sample.
        sample_offset: global index of this call's first sample, so that sampling does not depend
            on how prompts are split over data-parallel ranks (prompt index * n_samples).
        use_kv_cache: False recomputes every whole sequence at every step with megatron's forward
            (the reference the cached engine is tested against; all rows at once).
        record_entropy: also record the sampling distribution's entropy per student token (an
            extra pass over the vocabulary shard per step), else zeros.
        rollout_batch_size: rows in flight at once (the KV cache holds this many); None: all.
        max_prefill_tokens: tokens (padding included) of one prefill forward; None: no limit.
    """
    rows, prompt_lengths = _rows(prompts, prefixes, params.n_samples, sample_offset)
    _check(rows, params, vocab_size, model.max_sequence_length)
    for name, value in (("rollout_batch_size", rollout_batch_size),
                        ("max_prefill_tokens", max_prefill_tokens)):
        if value is not None and value < 1:
            raise GenerationError(f"{name} must be >= 1, got {value}")
    with _eval_mode(model), torch.inference_mode():
        if use_kv_cache:
            engine = Engine(model, rows, params, vocab_size, rollout_batch_size or len(rows),
                            max_prefill_tokens, record_entropy)
            sampled = engine.run()
        else:
            sampled = _recompute(model, rows, params, vocab_size, record_entropy)
    return _batch(rows, prompt_lengths, sampled)


@cuda_to_cpu()
def _recompute(model, rows: List[Row], params, vocab_size: int, record_entropy: bool) -> Sampled:
    """The reference: every row at once, megatron's full forward of each whole sequence so far at
    every step, the logits at each row's last token."""
    device = next(model.parameters()).device
    n_rows = len(rows)
    stage = GenerationStage(model, max(len(r.context) for r in rows) + params.max_new_tokens,
                            n_rows)
    tokens = torch.zeros((n_rows, stage.rope.shape[0]), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        tokens[b, :len(row.context)] = torch.tensor(row.context)
    lengths = torch.tensor([len(r.context) for r in rows], device=device)
    sample_ids = torch.tensor([r.sample_id for r in rows], device=device)
    prefix_lengths = torch.tensor([r.prefix_length for r in rows], device=device)
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    done = (prefix_lengths > 0) & torch.isin(tokens[torch.arange(n_rows), lengths - 1], stop_ids)
    shape = (n_rows, params.max_new_tokens)
    sampled = Sampled(torch.zeros(shape, dtype=torch.long, device=device),
                      torch.zeros(shape, device=device), torch.zeros(shape, device=device),
                      [0] * n_rows)
    rows_index = torch.arange(n_rows, device=device)
    for step in range(params.max_new_tokens):
        if done.all():
            break
        logits = stage.full_forward(tokens[:, :int(lengths.max())], lengths - 1)
        ids = torch.empty(n_rows, dtype=torch.long, device=device)
        if stage.is_last:
            uniforms = (uniform_from_keys(sampling_keys(params.seed, sample_ids,
                                                              prefix_lengths + step))
                        if params.temperature > 0 else None)
            ids = sample(logits, vocab_size, uniforms, params.temperature, params.top_k,
                            params.top_p)
            if record_entropy:
                sampled.log_probs[:, step], sampled.entropy[:, step] = (
                    vp.token_log_probs_and_entropy(logits, ids, vocab_size))
            else:
                sampled.log_probs[:, step] = vp.token_log_probs(logits, ids, vocab_size)
        stage.broadcast_from_last(ids)
        sampled.ids[:, step] = ids
        live = ~done
        tokens[rows_index[live], lengths[live]] = ids[live]
        for b in live.nonzero().flatten().tolist():
            sampled.counts[b] = step + 1
        lengths = lengths + live.long()
        done |= torch.isin(ids, stop_ids)
    stats = stage.broadcast_from_last(torch.stack([sampled.log_probs, sampled.entropy]))
    sampled.log_probs, sampled.entropy = stats[0], stats[1]
    return sampled


def _batch(rows: List[Row], prompt_lengths: List[int], sampled: Sampled) -> RolloutBatch:
    """The rollout batch of `rows` from what was sampled: sequences from column 0 and the record
    of their response tokens (teacher prefix, then the student's)."""
    device = sampled.ids.device
    sequences, ids, on_policy, old_logprobs, entropy = [], [], [], [], []
    for b, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        n = sampled.counts[b]
        context = torch.tensor(row.context, dtype=torch.long, device=device)
        student = sampled.ids[b, :n]
        sequences.append(torch.cat([context, student]))
        prefix = torch.zeros(row.prefix_length, device=device)
        ids += [context[prompt_length:], student]
        on_policy += [prefix.bool(), torch.ones(n, dtype=torch.bool, device=device)]
        old_logprobs += [prefix, sampled.log_probs[b, :n]]
        entropy += [prefix, sampled.entropy[b, :n]]
    record = TokenRecord(ids=torch.cat(ids), on_policy=torch.cat(on_policy),
                         old_logprobs=torch.cat(old_logprobs).float(),
                         student_entropy=torch.cat(entropy).float())
    return RolloutBatch(sequences=sequences, prompt_lengths=prompt_lengths, record=record,
                        prefix_lengths=[row.prefix_length for row in rows],
                        sample_ids=[row.sample_id for row in rows])


def _rows(prompts, prefixes, n_samples, sample_offset) -> Tuple[List[Row], List[int]]:
    """Every sample row (context = prompt + prefix), and its prompt length."""
    if len(prompts) == 0:
        raise GenerationError("no prompts to generate from")
    if prefixes is None:
        prefixes = [()] * len(prompts)
    if len(prefixes) != len(prompts):
        raise GenerationError(f"{len(prefixes)} teacher prefixes for {len(prompts)} prompts")
    rows, prompt_lengths = [], []
    for i, (prompt, prefix) in enumerate(zip(prompts, prefixes)):
        prompt, prefix = tuple(int(t) for t in prompt), tuple(int(t) for t in prefix)
        if not prompt:
            raise GenerationError(f"prompt {i} is empty")
        for j in range(n_samples):
            rows.append(Row(prompt + prefix, len(prefix), sample_offset + i * n_samples + j))
            prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


def _check(rows, params, vocab_size, max_sequence_length):
    longest = max(range(len(rows)), key=lambda r: len(rows[r].context))
    if len(rows[longest].context) + params.max_new_tokens > max_sequence_length:
        raise GenerationError(
            f"row {longest}: context of {len(rows[longest].context)} tokens + max_new_tokens "
            f"{params.max_new_tokens} exceeds the model's maximum sequence length "
            f"{max_sequence_length}"
        )
    low = min(min(r.context) for r in rows)
    high = max(max(r.context) for r in rows)
    if low < 0 or high >= vocab_size:
        raise GenerationError(
            f"token ids must lie in [0, {vocab_size}), got ids from {low} to {high}"
        )


@contextlib.contextmanager
def _eval_mode(model):
    """Generation is inference (no dropout); the model is given back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
