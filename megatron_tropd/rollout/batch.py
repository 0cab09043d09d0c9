"""The rollout batch: what generation hands to teacher scoring and to the student update.

Layout (the same for generation, the teacher's scoring pass and the student's training forward, so
all three compute the same thing): each row's context, the prompt followed by an optional teacher
prefix, is *left*-padded to end at column `context_width`; the tokens the student sampled follow
from that column on, and a row that stopped early is padded on the right.

    column:   0 ......... context_width ......... T
    row 0:    pad pad [prompt][prefix] [student tokens, stop] pad
    row 1:    [prompt ............] [student tokens ............]

Left padding keeps every row's next token at the same column, which megatron-core's static KV cache
needs. RoPE scores depend only on the distance between query and key, so a row's shifted absolute
positions change nothing but rounding; the padded keys are hidden by `attention_mask`.

Per-token tensors are aligned with `tokens`: entry `[b, j]` is about token j (its log-prob given the
tokens before it), so they come from the logits at column j - 1.
"""

import dataclasses
from typing import List

import torch


def causal_padding_mask(padding, query_start: int, query_length: int):
    """Attention mask for queries at columns `[query_start, query_start + query_length)` over the
    keys `[0, query_start + query_length)`: `[B, 1, query_length, keys]` bool, True = masked
    (a future key, or a key that is padding).

    A padding query attends to itself, so that no row is masked entirely (fused softmax kernels
    return NaN for such rows, and NaN values would leak through zero attention weights). A decode
    step (one query) needs no such care: every row has its context before it.

    Args:
        padding: `[B, >= keys]` bool, True where the column holds padding.
    """
    keys = query_start + query_length
    key_padding = padding[:, None, None, :keys]
    if query_length == 1:
        return key_padding
    key_columns = torch.arange(keys, device=padding.device)
    query_columns = torch.arange(query_start, keys, device=padding.device)[:, None]
    hidden = (key_columns > query_columns) | key_padding
    return hidden & (key_columns != query_columns)


@dataclasses.dataclass
class RolloutBatch:
    """Sampled sequences of one generation call (every rank of the model-parallel group holds the
    same batch).

    Args:
        tokens: `[B, T]` int64, layout in the module docstring.
        prompt_lengths: `[B]` prompt tokens per row.
        prefix_lengths: `[B]` teacher-prefix tokens per row (0 for on-policy rows).
        context_width: the column at which every row's context (prompt + prefix) ends.
        student_mask: `[B, T]` bool, the tokens the student sampled, up to and including a stop
            id: the tokens of the on-policy loss (nothing after a stop id).
        lp_S_old: `[B, T]` float32, log-prob of each student token under the sampling model's
            untempered, untruncated distribution, i.e. what a training-mode forward of the same
            weights gives (so the importance ratio starts at 1); 0 outside `student_mask`.
        student_entropy: `[B, T]` float32, entropy of the sampling model's untempered distribution
            at each student token when `generate(record_entropy=True)` (REOPOLD / Entropy-OPD
            rank tokens by it); 0 outside `student_mask` and otherwise.
        sample_ids: `[B]` global sample index of each row (prompt index * n_samples + sample).
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    prefix_lengths: torch.Tensor
    context_width: int
    student_mask: torch.Tensor
    lp_S_old: torch.Tensor
    student_entropy: torch.Tensor
    sample_ids: torch.Tensor

    def _columns(self):
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :]

    @property
    def prefix_mask(self):
        """`[B, T]` bool: the teacher-prefix tokens (imitation term, not the on-policy loss)."""
        cols = self._columns()
        return (cols >= self.context_width - self.prefix_lengths[:, None]) & (
            cols < self.context_width
        )

    @property
    def response_mask(self):
        """`[B, T]` bool: every response token, teacher prefix and student tokens alike."""
        return self.prefix_mask | self.student_mask

    @property
    def padding(self):
        """`[B, T]` bool: columns holding padding (left of the prompt, right of the end)."""
        context_start = self.context_width - self.prompt_lengths - self.prefix_lengths
        cols = self._columns()
        in_context = (cols >= context_start[:, None]) & (cols < self.context_width)
        return ~(in_context | self.student_mask)

    def attention_mask(self):
        """`[B, 1, T, T]` bool, True = masked: causal and padding, for a full forward."""
        return causal_padding_mask(self.padding, 0, self.tokens.shape[1])

    def responses(self) -> List[List[int]]:
        """Each row's response ids (teacher prefix + student tokens, stop id included)."""
        return [row[mask].tolist() for row, mask in zip(self.tokens, self.response_mask)]
