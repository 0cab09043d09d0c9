"""Training and evaluation data: prompt files, SFT pairs and teacher responses read into token
ids, and the sampler that deals prompts to data-parallel ranks in a deterministic, resumable order.

Files are JSON Lines, JSON, Parquet or a `datasets` save_to_disk directory (`records.read_rows`),
one row a prompt; unknown columns are ignored. The columns read (`Columns`, flags `--prompt-key`,
`--messages-key`, `--answer-key`, `--response-key`, `--source-key`):
- the prompt: a `prompt` text, or chat `messages` ([{"role": ..., "content": ...}, ...]); a
  `prompt` column holding such a list (verl's files) is messages too;
- `answer` (optional): what a verifier checks a response against (a string or a number); a dotted
  key reads a nested field (`reward_model.ground_truth`);
- `source` (optional): the benchmark a row comes from, for per-source evaluation;
- SFT rows also a `response` text.
`--system-prompt` adds a system turn to prompts that have none. Teacher responses have a format of
their own (`load_teacher_responses`).

Every problem with a file is a `DataError` whose one-line message names it: `path:line: what is
wrong` (`path:row i:` outside JSON Lines; `path: what is wrong` when the whole file is).
"""

import dataclasses
from typing import Optional

import torch

from megatron_tropd.records import DataError
from megatron_tropd.records import column as _column
from megatron_tropd.records import json_type, read_rows
from megatron_tropd.runtime.initialize import print_rank_0
from megatron_tropd.tokenizer import (Tokenizer, TokenizerError, check_template, plain_chat_text,
                                      prompt_ids)

__all__ = ["DataError", "Columns", "load_prompts", "load_sft", "load_teacher_responses",
           "PromptSampler"]


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which columns of a data file hold what (a dotted name reads a nested field)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    response: str = "response"
    source: str = "data_source"
    system_prompt: Optional[str] = None  # a system turn for prompts without one


def add_column_args(group):
    """The flags of `Columns`, for every command that reads prompt files."""
    d = Columns()
    group.add_argument("--prompt-key", default=d.prompt,
                       help="column of the prompt text (or of a list of chat messages)")
    group.add_argument("--messages-key", default=d.messages, help="column of chat messages")
    group.add_argument("--answer-key", default=d.answer,
                       help="column of the reference answer (dotted for a nested field, e.g. "
                            "reward_model.ground_truth)")
    group.add_argument("--response-key", default=d.response, help="column of SFT responses")
    group.add_argument("--source-key", default=d.source,
                       help="column naming each row's source benchmark (per-source results)")
    group.add_argument("--system-prompt", help="system turn added to prompts that have none")


def columns_from_args(args) -> Columns:
    return Columns(prompt=args.prompt_key, messages=args.messages_key, answer=args.answer_key,
                   response=args.response_key, source=args.source_key,
                   system_prompt=args.system_prompt)


def _value(where: str, row: dict, key: str, optional: bool = False):
    value = _column(row, key, None)
    if value is None and not optional:
        raise DataError(f"{where}: missing '{key}'")
    return value


def _string(where: str, row: dict, key: str, *, optional: bool = False,
            allow_empty: bool = False) -> Optional[str]:
    """`row[key]`, checked to be a string; None when `optional` and absent or null."""
    value = _value(where, row, key, optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: '{key}' is empty")
    return value


def _answer(where: str, row: dict, key: str) -> Optional[str]:
    """The reference answer as text (numbers, as GSM8K-style files hold them, too)."""
    value = _value(where, row, key, optional=True)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: '{key}' must be a string or a number, got {json_type(value)}")


def _messages(where: str, key: str, messages) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{key}' must be an array, got {json_type(messages)}")
    if not messages:
        raise DataError(f"{where}: '{key}' is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {json_type(message)}")
        _string(f"{where}: {key}[{i}]", message, "role")
        # An empty turn is legitimate (say, an empty system prompt).
        _string(f"{where}: {key}[{i}]", message, "content", allow_empty=True)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt(where: str, row: dict, tokenizer: Tokenizer, template: str, columns: Columns):
    """(prompt ids, prompt text for logs) of a row with a prompt or messages column."""
    has_prompt = _column(row, columns.prompt, None) is not None
    if has_prompt == (_column(row, columns.messages, None) is not None):
        held = "both" if has_prompt else "neither"
        raise DataError(f"{where}: needs exactly one of '{columns.prompt}' and "
                        f"'{columns.messages}', has {held}")
    prompt, messages = None, None
    if has_prompt and not isinstance(_column(row, columns.prompt), list):
        prompt = _string(where, row, columns.prompt)
    else:
        key = columns.prompt if has_prompt else columns.messages
        messages = _messages(where, key, _column(row, key))
    if columns.system_prompt is not None:
        messages = messages or [{"role": "user", "content": prompt}]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": columns.system_prompt}, *messages]
        prompt = None
    text = prompt if messages is None else plain_chat_text(messages)
    try:
        return prompt_ids(tokenizer, prompt, messages, template), text
    except TokenizerError as e:
        raise DataError(f"{where}: {e}")


@dataclasses.dataclass
class PromptExample:
    index: int  # the row's place in the file, from 0
    prompt_ids: list[int]
    answer: Optional[str]  # what a verifier checks the response against
    prompt_text: str  # for logs: the prompt, or the messages in the plain template
    source: Optional[str] = None  # the benchmark the row comes from


def load_prompts(path, tokenizer: Tokenizer, template: str = "auto",
                 max_prompt_length: Optional[int] = None,
                 columns: Columns = Columns()) -> list[PromptExample]:
    """Prompts of a data file, tokenized with `template` (see `tokenizer.prompt_ids`)."""
    check_template(tokenizer, template)
    examples, unknown = [], _UnknownCharacters(path, tokenizer)
    for index, (where, row) in enumerate(read_rows(path)):
        ids, text = _prompt(where, row, tokenizer, template, columns)
        unknown.check(where, text, ids)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise DataError(f"{where}: prompt is {len(ids)} tokens, longer than the maximum "
                            f"prompt length {max_prompt_length}")
        source = _value(where, row, columns.source, optional=True)
        examples.append(PromptExample(index, ids, _answer(where, row, columns.answer), text,
                                      None if source is None else str(source)))
    unknown.report()
    return examples


class _UnknownCharacters:
    """Rows of a file whose text holds characters the tokenizer maps to its unknown id (the
    model would see `<unk>` there): one warning a file, with the count and the first row's
    characters."""

    def __init__(self, path, tokenizer: Tokenizer):
        self.path, self.tokenizer = path, tokenizer
        self.rows, self.first = 0, None

    def check(self, where: str, text: str, ids: list[int]):
        unk = self.tokenizer.unk_id
        if unk is None or unk not in ids:
            return
        self.rows += 1
        if self.first is None:
            chars = [c for c in dict.fromkeys(text) if unk in self.tokenizer.encode(c)]
            self.first = (where, chars)

    def report(self):
        if self.rows:
            where, chars = self.first
            place = where[len(str(self.path)) + 1:]  # "3" (a JSON line) or "row 2"
            place = place if place.startswith("row") else f"line {place}"
            print_rank_0(f"warning: {self.path}: {self.rows} row(s) hold characters the "
                         f"tokenizer maps to its unknown token (first at {place}: "
                         f"{', '.join(map(repr, chars))})")


@dataclasses.dataclass
class SFTExample:
    input_ids: list[int]  # prompt, response, EOS
    prompt_length: int    # the tokens before the response (not trained on)


def load_sft(path, tokenizer: Tokenizer, template: str = "auto",
             max_length: Optional[int] = None, columns: Columns = Columns()) -> list[SFTExample]:
    """Prompt-response pairs of a data file; the response is followed by the EOS id."""
    check_template(tokenizer, template)
    examples, unknown = [], _UnknownCharacters(path, tokenizer)
    for where, row in read_rows(path):
        ids, text = _prompt(where, row, tokenizer, template, columns)
        response_text = _string(where, row, columns.response)
        response = tokenizer.encode(response_text) + [tokenizer.eos_id]
        unknown.check(where, text + response_text, ids + response)
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
    responses, rows = {}, {}
    for where, record in read_rows(path):
        prompt = tuple(token_ids(where, record, "prompt_ids", vocab_size))
        if prompt in rows:
            raise DataError(f"{where}: the same prompt_ids are already given at {rows[prompt]}")
        responses[prompt], rows[prompt] = token_ids(where, record, "response_ids", vocab_size), where
    return responses


def token_ids(where: str, record: dict, key: str, vocab_size: Optional[int]) -> list[int]:
    """`record[key]` as token ids: an array of non-negative integers below `vocab_size` (when
    given), else a one-line `DataError` naming `where`."""
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
            raise DataError(f"the data sampler state was saved with seed {state['seed']}, this "
                            f"run has seed {self.seed}")
        # consumed = epoch * N + position holds for any state of a sampler over N prompts, so a
        # mismatch means the prompt file changed size since the save.
        if not 0 <= position < self.num_examples or (
                state["consumed_samples"] != epoch * self.num_examples + position):
            raise DataError(f"the data sampler state (epoch {epoch}, position {position}, "
                            f"{state['consumed_samples']} consumed samples) does not fit "
                            f"{self.num_examples} prompts")
        self.epoch, self.position = epoch, position
        self.consumed_samples = state["consumed_samples"]
