"""Read and write the weights of HF model directories (safetensors, one file or an index of
shards), one tensor at a time, plus the tokenizer files that travel with a model.

Reading opens a file for each tensor and closes it again, so memory-mapped pages do not pile up
into a second copy of the model; writing starts a new shard file when the current one would pass
`max_shard_bytes`. Bad input raises `CheckpointError` with a one-line message.
"""

import json
import os
import shutil
from typing import Dict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_tropd.checkpoint import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a model directory carries besides config.json and weights: the tokenizer in its HF
# formats, the chat template, and generation defaults (eos ids, sampling settings).
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Buffers some older checkpoints saved that carry no weights (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFWeights:
    """The tensors of an HF model directory: names and shapes up front, data one tensor at a time.

    Opening checks that every file the index names exists and holds all the bytes its header
    promises (a truncated download fails here, not halfway through a conversion).
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index_path} is not a safetensors index: {e!r}") from None
            listed_in = f" (listed in {INDEX_FILE})"
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files, listed_in = [SINGLE_FILE], ""
        else:
            raise CheckpointError(
                f"no safetensors weights in {directory} (expected {SINGLE_FILE} or {INDEX_FILE})"
            )
        self._file_of: Dict[str, str] = {}
        self.shapes: Dict[str, tuple] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"missing safetensors file {path}{listed_in}")
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self._file_of[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except SafetensorError as e:
                raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None

    def check(self, expected: Dict[str, tuple]):
        """The tensors must be exactly `expected` (name -> shape), or a one-line error."""
        present = {k for k in self.shapes if not k.endswith(_IGNORED_SUFFIXES)}
        missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
        if missing:
            raise CheckpointError(f"{len(missing)} tensors missing from the weights: "
                                  f"{_first(missing)}")
        if unexpected:
            raise CheckpointError(f"{len(unexpected)} tensors the model config does not explain: "
                                  f"{_first(unexpected)}")
        wrong = [f"{k} {list(self.shapes[k])} (config says {list(v)})"
                 for k, v in expected.items() if self.shapes[k] != tuple(v)]
        if wrong:
            raise CheckpointError(f"{len(wrong)} tensors have unexpected shapes: {_first(wrong)}")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)


class SafetensorsWriter:
    """Write tensors into `directory` as HF shards of at most `max_shard_bytes` each (a tensor
    larger than that gets a shard of its own): `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = []  # (temporary file name, tensor names)
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self):
        tmp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, os.path.join(self.directory, tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self):
        """Write what is pending and give the shards their final names (the count is known now)."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(os.path.join(self.directory, self._shards[0][0]),
                      os.path.join(self.directory, SINGLE_FILE))
            return
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map},
                      f, indent=2, sort_keys=True)


def copy_companion_files(source: str, target: str):
    """Copy the tokenizer and generation files `source` has (see `COMPANION_FILES`)."""
    for name in COMPANION_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(target, name))


def _first(items, n=3) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
