"""The rollout batch: what generation hands to teacher scoring and to the student update.

A `TokenBatch` (layout in `megatron_tropd.tokens`: every row from column 0, its prompt, an optional
teacher prefix and the tokens the student sampled, up to and including a stop id) with what a
rollout adds: each row's teacher-prefix length and global sample id. Its record holds one entry per
response token (prefix and student tokens): the token, whether the student sampled it, and the
sampler's untempered log-prob `lp_S_old` and entropy there (0 on prefix tokens).
"""

import dataclasses
from typing import List

import torch

from megatron_tropd.tokens import TokenBatch


@dataclasses.dataclass
class RolloutBatch(TokenBatch):
    """Sampled sequences of one generation call (every rank of the model-parallel group holds the
    same batch).

    Args:
        prefix_lengths: per row, the teacher-prefix tokens after the prompt (0: on-policy row).
        sample_ids: per row, its global sample index (prompt index * n_samples + sample): with the
            position in the response, the key of every random draw about the row.
    """

    prefix_lengths: List[int] = dataclasses.field(default_factory=list)
    sample_ids: List[int] = dataclasses.field(default_factory=list)

    @property
    def student_lengths(self) -> List[int]:
        """Tokens the student sampled per row (a stop id included)."""
        return [n - p for n, p in zip(self.scored_lengths, self.prefix_lengths)]

    def responses(self) -> List[List[int]]:
        """Each row's response ids (teacher prefix + student tokens, stop id included)."""
        return [s[p:].tolist() for s, p in zip(self.sequences, self.prompt_lengths)]

    def record_sample_ids(self) -> torch.Tensor:
        """`[N]` int64: the sample id of every record entry's row."""
        ids = torch.tensor(self.sample_ids, dtype=torch.long, device=self.record.ids.device)
        return ids[self.record_rows()]
