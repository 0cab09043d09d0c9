"""Continuous batching: the rows of a generation call decoded through a fixed number of slots.

At most `slots` rows are in flight; the KV cache is sized for them, not for the batch. A row that
stops (a stop id, or `max_new_tokens` sampled) frees its slot at once, and the next queued row
takes it before the next decode step, so the steps keep every slot busy instead of waiting for
the longest row of a static batch. Rows whose context is the same (the n samples of a prompt)
share one prefill: the context is computed once and its keys and values copied into each row's
slot, also when the rows are admitted at different steps (the context waits in the cache's
staging row).

A row enters with its context (prompt + teacher prefix): the context minus its last token is
prefilled into the slot, and the last token is the row's first decode input, whose logits give the
first sampled token; so prefill never needs the output layer. Each decode step runs one token in
every slot, each at its own position.

Every decision here depends only on the rows and on the sampled ids (broadcast from the last
pipeline stage), so all ranks of the model-parallel group make the same ones, and the ids depend
on nothing but the rows' keys: sampling draws are keyed by (seed, sample id, response position),
so a row gets the same tokens whatever the slot count, the order of admission or the layout.
"""

import collections
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.ops.keys import sampling_keys, uniform_from_keys
from megatron_tropd.ops.sampling import sample
from megatron_tropd.rollout.kv_cache import KVCache
from megatron_tropd.rollout.stage import GenerationStage


@dataclasses.dataclass
class Row:
    """One sample to generate: its context (prompt + teacher prefix), the prefix's length and its
    global sample id."""

    context: Tuple[int, ...]
    prefix_length: int
    sample_id: int


@dataclasses.dataclass
class Sampled:
    """What the student sampled for each row, `[B, max_new_tokens]` buffers: `ids`, `lp_S_old` and
    `entropy` (float32, last pipeline stage only until `Engine.run` shares them) of the first
    `counts[b]` tokens of row b."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    counts: List[int]


class Engine:
    """Decode `rows` through `slots` slots on this rank's model stage (collective over the
    model-parallel group: every rank passes the same rows).

    Args:
        model: this rank's GPTModel stage.
        rows: the samples, in the order they are admitted.
        params: `generate.SamplingParams` (temperature, top-k/p, max_new_tokens, stop ids, seed).
        vocab_size: the true vocabulary (padded logit columns are never sampled).
        slots: rows in flight at once.
        max_prefill_tokens: tokens (padding included) of one prefill forward; None: no limit.
        record_entropy: record the sampling distribution's entropy per token (else zeros).
    """

    def __init__(self, model, rows: Sequence[Row], params, vocab_size: int, slots: int,
                 max_prefill_tokens: Optional[int] = None, record_entropy: bool = False):
        self.rows, self.params, self.vocab_size = list(rows), params, vocab_size
        self.record_entropy = record_entropy
        self.max_prefill_tokens = max_prefill_tokens
        self.device = next(model.parameters()).device
        self.stop_ids = set(params.stop_ids)
        # A teacher prefix that ends in a stop id leaves the row nothing to sample.
        self.queue = collections.deque(
            r for r, row in enumerate(self.rows)
            if not (row.prefix_length > 0 and row.context[-1] in self.stop_ids))
        self.slots = max(1, min(slots, len(self.queue)))
        # sized for the rows that sample (a guided row whose prefix is a whole teacher response
        # needs no slot)
        max_length = max((len(self.rows[r].context) for r in self.queue), default=1) + \
            params.max_new_tokens
        self.stage = GenerationStage(model, max_length, self.slots)
        self.cache = KVCache(model, self.slots, max_length, self.stage.rope)
        self.staged = None  # the context in the cache's staging row
        # per slot: its row (None: free), cached positions, tokens sampled; the next decode input
        self.slot_row: List[Optional[int]] = [None] * self.slots
        self.length = [0] * self.slots
        self.steps = [0] * self.slots
        self.next_input = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        shape = (len(self.rows), params.max_new_tokens)
        self.sampled = Sampled(
            ids=torch.zeros(shape, dtype=torch.long, device=self.device),
            log_probs=torch.zeros(shape, dtype=torch.float32, device=self.device),
            entropy=torch.zeros(shape, dtype=torch.float32, device=self.device),
            counts=[0] * len(self.rows))

    def run(self) -> Sampled:
        while True:
            self._admit()
            active = [s for s in range(self.slots) if self.slot_row[s] is not None]
            if not active:
                break
            self._step(active)
        # Only the last stage computed the sampler's statistics.
        stats = self.stage.broadcast_from_last(
            torch.stack([self.sampled.log_probs, self.sampled.entropy]))
        self.sampled.log_probs, self.sampled.entropy = stats[0], stats[1]
        return self.sampled

    def _step(self, active: List[int]):
        """One decode step of every slot; the active slots' tokens are recorded."""
        params = self.params
        positions = torch.tensor(self.length, device=self.device)
        logits = self.stage.decode(self.cache, self.next_input, positions,
                                   max(self.length[s] for s in active) + 1)
        ids = torch.empty(self.slots, dtype=torch.long, device=self.device)
        rows = torch.tensor([self.slot_row[s] for s in active], device=self.device)
        steps = torch.tensor([self.steps[s] for s in active], device=self.device)
        where = torch.tensor(active, device=self.device)
        if self.stage.is_last:
            ids = sample(logits, self.vocab_size, self._uniforms(),
                            params.temperature, params.top_k, params.top_p)
            if self.record_entropy:
                log_probs, entropy = vp.token_log_probs_and_entropy(logits, ids, self.vocab_size)
                self.sampled.entropy[rows, steps] = entropy[where]
            else:
                log_probs = vp.token_log_probs(logits, ids, self.vocab_size)
            self.sampled.log_probs[rows, steps] = log_probs[where].float()
        self.stage.broadcast_from_last(ids)
        self.sampled.ids[rows, steps] = ids[where]
        self.next_input = ids
        host_ids = ids.tolist()
        for s in active:
            self.length[s] += 1
            self.steps[s] += 1
            row = self.slot_row[s]
            self.sampled.counts[row] = self.steps[s]
            if host_ids[s] in self.stop_ids or self.steps[s] == params.max_new_tokens:
                self.slot_row[s] = None
                self.length[s] = 0  # a free slot decodes a throw-away token at position 0

    def _uniforms(self):
        """The sampler's draw for every slot, keyed by (seed, sample id, response position);
        None when greedy. Free slots draw too (their ids are thrown away)."""
        if self.params.temperature == 0:
            return None
        sample_ids, positions = [], []
        for s in range(self.slots):
            row = self.slot_row[s]
            sample_ids.append(0 if row is None else self.rows[row].sample_id)
            positions.append(0 if row is None else self.rows[row].prefix_length + self.steps[s])
        return uniform_from_keys(sampling_keys(
            self.params.seed, torch.tensor(sample_ids, device=self.device),
            torch.tensor(positions, device=self.device)))

    def _admit(self):
        """Queued rows into the free slots: contexts cached (a context shared by several rows
        computed once), the context's last token the slot's next input."""
        admitted = []
        for slot in range(self.slots):
            if self.slot_row[slot] is None and self.queue:
                admitted.append((slot, self.queue.popleft()))
        if not admitted:
            return
        groups = {}  # context -> slots taking it, in admission order
        for slot, row in admitted:
            groups.setdefault(self.rows[row].context, []).append(slot)
        to_prefill = []
        for context, slots in groups.items():
            if context == self.staged:
                self.cache.copy(self.cache.staging, slots, len(context) - 1)
            elif len(context) > 1:
                to_prefill.append((context, slots))
        self._prefill(to_prefill)
        last_slot, last_row = admitted[-1]
        context = self.rows[last_row].context
        if self.queue and self.rows[self.queue[0]].context == context and context != self.staged:
            self.cache.copy(last_slot, [self.cache.staging], len(context) - 1)
            self.staged = context
        for slot, row in admitted:
            context = self.rows[row].context
            self.slot_row[slot], self.length[slot], self.steps[slot] = row, len(context) - 1, 0
            self.next_input[slot] = context[-1]

    def _prefill(self, groups):
        """Cache every context but its last token, `max_prefill_tokens` (padding included) at a
        time, into its slots."""
        start = 0
        while start < len(groups):
            end = start + 1
            longest = len(groups[start][0]) - 1
            while end < len(groups) and (self.max_prefill_tokens is None or (end + 1 - start) * max(
                    longest, len(groups[end][0]) - 1) <= self.max_prefill_tokens):
                longest = max(longest, len(groups[end][0]) - 1)
                end += 1
            chunk = groups[start:end]
            tokens = torch.zeros((len(chunk), longest), dtype=torch.long)
            sources, slots = [], []
            for i, (context, targets) in enumerate(chunk):
                tokens[i, :len(context) - 1] = torch.tensor(context[:-1])
                sources += [i] * len(targets)
                slots += targets
            self.stage.prefill(self.cache, tokens.to(self.device), sources, slots)
            start = end
