"""Teacher responses for off-policy guidance: generated online by the teacher model in the same job
(same generation code and sampler as the student), or read from a JSONL file written beforehand by
`tools/generate_teacher_responses.py` (its format, and how responses are looked up by their
prompt's token ids: `data.load_teacher_responses`).
"""

import dataclasses
import json
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_tropd.data import DataError
from megatron_tropd.rollout.generate import SamplingParams, generate


def online_teacher_responses(teacher, prompts: Sequence[Sequence[int]], params: SamplingParams,
                             vocab_size: int, sample_offset: int = 0,
                             **engine) -> List[List[int]]:
    """One teacher response per prompt, sampled by the teacher model (collective over the
    model-parallel group, like `generate`; `engine`: its rollout batch size and prefill budget).
    `sample_offset`: the global index of the first prompt, the key of its draws."""
    if params.n_samples != 1:
        raise ValueError(f"one teacher response per prompt: n_samples must be 1, "
                         f"got {params.n_samples}")
    return generate(teacher, prompts, params, vocab_size, sample_offset=sample_offset,
                    **engine).responses()


def write_teacher_responses(path: str, records: Sequence[dict]):
    """Write records (each with `prompt_ids` and `response_ids`) as JSONL."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def lookup_teacher_responses(responses: Dict[Tuple[int, ...], List[int]],
                             prompts: Sequence[Sequence[int]]) -> List[List[int]]:
    """The teacher response of each prompt, from `data.load_teacher_responses`'s dict."""
    out = []
    for i, prompt in enumerate(prompts):
        key = tuple(int(t) for t in prompt)
        if key not in responses:
            raise DataError(f"no teacher response for prompt {i} ({len(key)} tokens) in the "
                            f"teacher-responses file")
        out.append(responses[key])
    return out


# The trainer's two providers: (prompts, global index of the first of them) -> one teacher
# response per prompt (`batches.rollouts` cuts them into prefixes).


@dataclasses.dataclass
class OfflineTeacherResponses:
    """Responses looked up in `data.load_teacher_responses`'s dict by their prompt's token ids."""

    table: Dict[Tuple[int, ...], List[int]]

    def __call__(self, prompts, first_prompt: int) -> List[List[int]]:
        return lookup_teacher_responses(self.table, prompts)


@dataclasses.dataclass
class OnlineTeacherResponses:
    """Responses sampled by the teacher now, keyed by (seed, global prompt index, response
    position) like the student's samples: a prompt drawn again in a later epoch gets another
    response, and the draws do not depend on the data-parallel size."""

    teacher: object
    params: SamplingParams
    vocab_size: int
    rollout_batch_size: Optional[int] = None
    max_prefill_tokens: Optional[int] = None

    def __call__(self, prompts, first_prompt: int) -> List[List[int]]:
        return online_teacher_responses(self.teacher, prompts, self.params, self.vocab_size,
                                        sample_offset=first_prompt,
                                        rollout_batch_size=self.rollout_batch_size,
                                        max_prefill_tokens=self.max_prefill_tokens)
