"""Training data: JSONL files of prompts, SFT pairs and teacher responses read into token ids, and
the sampler that deals prompts to data-parallel ranks in a deterministic, resumable order.

File formats (one JSON object a line; blank lines skipped; unknown keys ignored):
- prompts: `{"prompt": "text"}` or `{"messages": [{"role": ..., "content": ...}, ...]}`, with an
  optional `"answer": "text"` for verifiers;
- SFT: the same plus `"response": "text"`;
- teacher responses: `{"index": <prompt index>, "response_ids": [ids]}`, or `"response": "text"`
  when a tokenizer is given. A prompt's index is its line's place among the file's non-blank lines,
  from 0.

Every problem with a file is a `DataError` whose one-line message names it:
`path:line: what is wrong` (`path: what is wrong` when the whole file is).
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_tropd.initialize import print_rank_0
from megatron_tropd.tokenizer import (Tokenizer, TokenizerError, check_template, plain_chat_text,
                                      prompt_ids)


class DataError(ValueError):
    """A data file that cannot be used, with `path:line:` and what is wrong in one line."""


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES[type(value)]


def read_jsonl(path) -> list[tuple[int, dict]]:
    """The file's objects with their 1-based line numbers, blank lines skipped."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    records = []
    # bytes.splitlines breaks only at \n, \r\n and \r, so numbers match what an editor shows.
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {_json_type(record)}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: empty file, no JSON lines")
    return records


def _string(where: str, record: dict, key: str, *, optional: bool = False,
            allow_empty: bool = False) -> Optional[str]:
    """`record[key]`, checked to be a string; None when `optional` and absent or null."""
    value = record.get(key)
    if value is None and optional:
        return None
    if key not in record:
        raise DataError(f"{where}: missing '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: '{key}' is empty")
    return value


def _messages(where: str, messages) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be an array, got {_json_type(messages)}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {_json_type(message)}")
        _string(f"{where}: messages[{i}]", message, "role")
        # An empty turn is legitimate (say, an empty system prompt).
        _string(f"{where}: messages[{i}]", message, "content", allow_empty=True)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _one_of(where: str, record: dict, first: str, second: str) -> str:
    """Which of two alternative keys the line holds; an error unless exactly one."""
    if (first in record) == (second in record):
        held = "both" if first in record else "neither"
        raise DataError(f"{where}: needs exactly one of '{first}' and '{second}', has {held}")
    return first if first in record else second


def _prompt(where: str, record: dict, tokenizer: Tokenizer, template: str):
    """(prompt ids, prompt text for logs) of a line with `prompt` or `messages`."""
    if _one_of(where, record, "prompt", "messages") == "prompt":
        prompt, messages = _string(where, record, "prompt"), None
        text = prompt
    else:
        prompt, messages = None, _messages(where, record["messages"])
        text = plain_chat_text(messages)
    try:
        return prompt_ids(tokenizer, prompt, messages, template), text
    except TokenizerError as e:
        raise DataError(f"{where}: {e}")


@dataclasses.dataclass
class PromptExample:
    index: int  # place of the line among the file's non-blank lines, from 0
    prompt_ids: list[int]
    answer: Optional[str]  # what a verifier checks the response against
    prompt_text: str  # for logs: the prompt, or the messages in the plain template


def load_prompts(path, tokenizer: Tokenizer, template: str = "auto",
                 max_prompt_length: Optional[int] = None) -> list[PromptExample]:
    """Prompts of a JSONL file, tokenized with `template` (see `tokenizer.prompt_ids`)."""
    check_template(tokenizer, template)
    examples, unknown = [], _UnknownCharacters(path, tokenizer)
    for index, (number, record) in enumerate(read_jsonl(path)):
        where = f"{path}:{number}"
        ids, text = _prompt(where, record, tokenizer, template)
        unknown.check(number, text, ids)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise DataError(f"{where}: prompt is {len(ids)} tokens, longer than the maximum "
                            f"prompt length {max_prompt_length}")
        answer = _string(where, record, "answer", optional=True, allow_empty=True)
        examples.append(PromptExample(index, ids, answer, text))
    unknown.report()
    return examples


class _UnknownCharacters:
    """Lines of a file whose text holds characters the tokenizer maps to its unknown id (the
    model would see `<unk>` there): one warning a file, with the count and the first line's
    characters."""

    def __init__(self, path, tokenizer: Tokenizer):
        self.path, self.tokenizer = path, tokenizer
        self.lines, self.first = 0, None

    def check(self, number: int, text: str, ids: list[int]):
        unk = self.tokenizer.unk_id
        if unk is None or unk not in ids:
            return
        self.lines += 1
        if self.first is None:
            chars = [c for c in dict.fromkeys(text) if unk in self.tokenizer.encode(c)]
            self.first = (number, chars)

    def report(self):
        if self.lines:
            number, chars = self.first
            print_rank_0(f"warning: {self.path}: {self.lines} line(s) hold characters the "
                         f"tokenizer maps to its unknown token (first at line {number}: "
                         f"{', '.join(map(repr, chars))})")


@dataclasses.dataclass
class SFTExample:
    input_ids: list[int]  # prompt, response, EOS
    prompt_length: int    # the tokens before the response (not trained on)


def load_sft(path, tokenizer: Tokenizer, template: str = "auto",
             max_length: Optional[int] = None) -> list[SFTExample]:
    """Prompt-response pairs of a JSONL file; the response is followed by the EOS id."""
    check_template(tokenizer, template)
    examples, unknown = [], _UnknownCharacters(path, tokenizer)
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        ids, text = _prompt(where, record, tokenizer, template)
        response_text = _string(where, record, "response")
        response = tokenizer.encode(response_text) + [tokenizer.eos_id]
        unknown.check(number, text + response_text, ids + response)
        input_ids = ids + response
        if max_length is not None and len(input_ids) > max_length:
            raise DataError(f"{where}: prompt, response and EOS are {len(input_ids)} tokens, "
                            f"longer than the maximum length {max_length}")
        examples.append(SFTExample(input_ids, len(ids)))
    unknown.report()
    return examples


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_teacher_responses(path, vocab_size: Optional[int] = None) -> dict:
    """Teacher responses keyed by the tuple of their prompt's token ids, from the JSONL file of
    `--teacher-responses`, the one place its format is defined: one object per line,

        {"prompt_ids": [1, 2, 3], "response_ids": [7, 8, 2], "prompt": "...", "response": "..."}

    ids of the student's tokenizer, the response ending in its stop id if it has one;
    `prompt` and `response` texts (tools/generate_teacher_responses.py writes them) are for
    reading and are ignored. Keying by prompt ids makes the file independent of the order and
    sharding of the training prompts; a prompt given twice is an error."""
    responses, lines = {}, {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = tuple(_token_ids(where, record, "prompt_ids", vocab_size))
        if prompt in lines:
            raise DataError(f"{where}: the same prompt_ids are already given on line {lines[prompt]}")
        responses[prompt], lines[prompt] = _token_ids(where, record, "response_ids", vocab_size), number
    return responses


def _token_ids(where: str, record: dict, key: str, vocab_size: Optional[int]) -> list[int]:
    if key not in record:
        raise DataError(f"{where}: missing '{key}'")
    ids = record[key]
    if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
        raise DataError(f"{where}: '{key}' must be an array of non-negative integers")
    if vocab_size is not None and any(i >= vocab_size for i in ids):
        raise DataError(f"{where}: '{key}' holds {max(ids)}, outside the vocabulary of "
                        f"{vocab_size} ids")
    return ids


class PromptSampler:
    """Which prompt indices each iteration trains on, per data-parallel rank.

    The global order is epoch after epoch, each a permutation of `range(num_examples)` drawn by a
    `torch.Generator` seeded with `seed + epoch`. An iteration takes the next `global_batch_size`
    indices of that order (crossing into the next epoch when one runs out) and DP rank r gets the
    r-th contiguous slice of them. Every rank walks the whole global batch, so the state is the same
    on all ranks and at any DP size: runs at DP=1 and DP=2, or a run resumed at another DP size,
    train on the same global batches.
    """

    def __init__(self, num_examples: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"no prompts to sample from (num_examples={num_examples})")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple "
                             f"of the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside 0..{dp_size - 1}")
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.epoch = self.position = self.consumed_samples = 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's prompt indices for the next iteration (global batch / DP size of them)."""
        batch = []
        while len(batch) < self.global_batch_size:
            taken = self._epoch_order()[
                self.position:self.position + self.global_batch_size - len(batch)]
            batch += taken
            self.position += len(taken)
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        self.consumed_samples += self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        return batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position,
                "consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = state["epoch"], state["position"]
        if state["seed"] != self.seed:
            raise ValueError(f"the data sampler state was saved with seed {state['seed']}, this "
                             f"run has seed {self.seed}")
        # consumed = epoch * N + position holds for any state of a sampler over N prompts, so a
        # mismatch means the prompt file changed size since the save.
        if not 0 <= position < self.num_examples or (
                state["consumed_samples"] != epoch * self.num_examples + position):
            raise ValueError(f"the data sampler state (epoch {epoch}, position {position}, "
                             f"{state['consumed_samples']} consumed samples) does not fit "
                             f"{self.num_examples} prompts")
        self.epoch, self.position = epoch, position
        self.consumed_samples = state["consumed_samples"]
