"""The per-token data path: rows of token ids, the packed record of their scored tokens, and the
micro-batches a forward pass runs on.

Layout. Every row starts at column 0 (a rollout row: prompt, optional teacher prefix, the
student's tokens; an SFT row: prompt, response) and rows have their own lengths. The tokens after
the prompt are *scored*: they get a prediction and a loss. A micro-batch is a few rows right-padded
to its longest row, so plain causal attention is exact without any mask: a real token attends only
to the tokens before it, all real, and padded positions are never scored.

    column:   0 ........................................... T
    row 0:    [prompt][prefix][student tokens, stop] pad pad
    row 1:    [prompt ........][student tokens ............]

The record (`TokenRecord`) holds one entry per scored token of the whole batch, packed `[N]` in
row-major order (row 0's scored tokens, then row 1's, ...). A micro-batch's scored tokens are the
record entries at its `index`, in the order `models.forward.scored_logits` returns their logits:
no `[B, T]` buffer is zero-scattered and gathered back anywhere.

Micro-batches are planned by length (`plan_micro_batches`): rows sorted longest first, filled up
to a row count and a token budget (rows x longest row, padding included), as NeMo-RL's and verl's
dynamic batching do; megatron's per-token loss keeps the token-mean over the global batch whatever
the split.
"""

import dataclasses
from typing import List, Optional, Sequence

import torch


@dataclasses.dataclass
class TokenRecord:
    """Per scored token, `[N]` (top-k fields `[N, k]`), filled in stages as the batch moves on:
    the rollout (`ids` ... `student_entropy`), the teacher's scoring pass (`teacher_*`), the
    trainer (`uniform`, `selected`) and, for one micro-batch, the student's forward (`student_*`,
    `reverse_kl`, `jsd`, with gradient). Fields a method does not read stay None.

    Notation of METHOD.md: lp_S = student_logprobs, lp_S_old = old_logprobs, lp_T =
    teacher_logprobs.
    """

    ids: torch.Tensor                                   # int64, the token scored
    on_policy: Optional[torch.Tensor] = None            # bool: sampled by the student (1[x~π_S]);
    #                                                     False: a teacher-prefix token (1[x~π_T])
    old_logprobs: Optional[torch.Tensor] = None         # float32 lp_S_old of the sampler (0: prefix)
    student_entropy: Optional[torch.Tensor] = None      # float32, entropy of the sampler (0: prefix)
    teacher_logprobs: Optional[torch.Tensor] = None     # float32 lp_T
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [N, k] float32, normalised, descending
    teacher_topk_ids: Optional[torch.Tensor] = None     # [N, k] int32 global ids of those
    teacher_entropy: Optional[torch.Tensor] = None      # float32, full-vocabulary H(π_T)
    uniform: Optional[torch.Tensor] = None              # float64 U(0,1) of the stochastic trust test
    selected: Optional[torch.Tensor] = None             # bool, REOPOLD / Entropy-OPD selection
    counted: Optional[torch.Tensor] = None              # bool: the tokens the token-mean is
    #                                                     over (None: every entry; REOPOLD: the
    #                                                     selected ones)
    student_logprobs: Optional[torch.Tensor] = None     # lp_S, with grad
    student_topk_logprobs: Optional[torch.Tensor] = None  # [N, k] at the teacher's ids, with grad
    reverse_kl: Optional[torch.Tensor] = None           # full-vocabulary KL(π_S||π_T), no grad
    jsd: Optional[torch.Tensor] = None                  # full-vocabulary JSD(β), with grad

    @property
    def prefix(self) -> torch.Tensor:
        """bool: the teacher-prefix tokens (scored by the imitation term, not the on-policy loss)."""
        return ~self.on_policy

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index) -> "TokenRecord":
        """The entries at `index` (a micro-batch's tokens), every field that is set."""
        return TokenRecord(**{f.name: None if getattr(self, f.name) is None
                              else getattr(self, f.name)[index]
                              for f in dataclasses.fields(self)})


@dataclasses.dataclass
class MicroBatch:
    """Rows of a batch for one forward: `tokens [b, T]` right-padded, `scored [b, T]` bool (the
    tokens after each row's prompt), `index [N_mb]` their entries in the batch's record, in
    row-major order of `scored`."""

    rows: List[int]
    tokens: torch.Tensor
    scored: torch.Tensor
    index: torch.Tensor


@dataclasses.dataclass
class TokenBatch:
    """Rows from column 0 and the record of their scored tokens (layout in the module docstring).

    Args:
        sequences: per row, its token ids `[length]` int64.
        prompt_lengths: per row, the tokens not scored (>= 1: column 0 has no prediction).
        record: one entry per scored token, row-major.
    """

    sequences: List[torch.Tensor]
    prompt_lengths: List[int]
    record: TokenRecord

    @property
    def lengths(self) -> List[int]:
        return [len(s) for s in self.sequences]

    @property
    def scored_lengths(self) -> List[int]:
        return [len(s) - p for s, p in zip(self.sequences, self.prompt_lengths)]

    def record_rows(self) -> torch.Tensor:
        """`[N]` int64: the row of every record entry."""
        device = self.record.ids.device
        return torch.repeat_interleave(torch.arange(len(self.sequences), device=device),
                                       torch.tensor(self.scored_lengths, device=device))

    def record_positions(self) -> torch.Tensor:
        """`[N]` int64: every record entry's position among its row's scored tokens (0 = the first
        token after the prompt)."""
        device = self.record.ids.device
        if not self.sequences:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat([torch.arange(n, device=device) for n in self.scored_lengths])

    def micro_batch(self, rows: Sequence[int], pad_id: int) -> MicroBatch:
        """`rows` (in this order) right-padded to the longest of them."""
        device = self.record.ids.device
        lengths = torch.tensor([len(self.sequences[r]) for r in rows], device=device)
        prompts = torch.tensor([self.prompt_lengths[r] for r in rows], device=device)
        tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long,
                            device=device)
        for i, r in enumerate(rows):
            tokens[i, :len(self.sequences[r])] = self.sequences[r]
        columns = torch.arange(tokens.shape[1], device=device)[None, :]
        scored = (columns >= prompts[:, None]) & (columns < lengths[:, None])
        offsets = [0]
        for n in self.scored_lengths:
            offsets.append(offsets[-1] + n)
        index = torch.cat([torch.arange(offsets[r], offsets[r + 1], device=device) for r in rows])
        return MicroBatch(list(rows), tokens, scored, index)


def plan_micro_batches(lengths: Sequence[int], max_rows: Optional[int],
                       max_tokens: Optional[int] = None) -> List[List[int]]:
    """Row indices of each micro-batch: rows sorted longest first (ties in row order), each
    micro-batch filled while it holds at most `max_rows` rows (None: any number) and, with
    `max_tokens`, at most that many tokens counting padding (rows x its first, longest row). A
    row longer than `max_tokens` is a micro-batch of its own. The plan depends only on the lengths, so every pipeline stage of
    a data-parallel rank, which holds the same rows, makes the same plan."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    plan: List[List[int]] = []
    for r in order:
        if plan:
            current = plan[-1]
            rows = len(current) + 1
            if (max_rows is None or rows <= max_rows) and (max_tokens is None
                                     or rows * lengths[current[0]] <= max_tokens):
                current.append(r)
                continue
        plan.append([r])
    return plan
