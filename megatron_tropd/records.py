"""The rows of a data file, whatever format the user has: JSON Lines, JSON, Parquet, or a
directory written by `datasets.Dataset.save_to_disk`.

`read_rows(path)` yields `(where, row)` pairs, `where` naming the row in errors: `path:line` for
JSON Lines (the line an editor shows), `path:row i` for the others (`i` from 0, as `dataset[i]`).
Rows stream: JSON Lines a line at a time, Parquet a record batch at a time (pyarrow), a saved
dataset through its memory-mapped Arrow files (HF `datasets`), so a file of a million rows is
never held as Python objects at once. A `.json` file is either a JSON array of objects (read
whole: the format has no row boundaries) or JSON Lines (what `datasets` writes by default).
`column(row, key)` reads a column; a dotted key reaches into nested objects, as verl's
`reward_model.ground_truth`.
"""

import json
import os
from pathlib import Path
from typing import Iterator

from megatron_tropd.errors import UserError

BATCH_ROWS = 1024  # rows converted to Python objects at a time (Parquet, saved datasets)
_MISSING = object()


class DataError(UserError):
    """A data file that cannot be used, with `path:line:` (or `path:row i:`) and what is wrong in
    one line."""


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def json_type(value) -> str:
    """What `value` is, in the words of JSON (an object, an array, ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_rows(path) -> Iterator[tuple[str, dict]]:
    """Every row of the file or saved dataset at `path` with where it is; an error when there is
    none."""
    path = str(path)
    if os.path.isdir(path):
        rows = _saved_dataset_rows(path)
    elif not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    elif path.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif path.endswith(".json") and _starts_with(path, b"["):
        rows = _json_array_rows(path)
    else:
        rows = _jsonl_rows(path)
    empty = True
    for where, row in rows:
        empty = False
        yield where, row
    if empty:
        raise DataError(f"{path}: empty file, no rows" if not os.path.isdir(path)
                        else f"{path}: the dataset has no rows")


def column(row: dict, key: str, default=_MISSING):
    """`row[key]`, a dotted key going into nested objects; `default` (or KeyError) when absent."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = value[part]
    return value


def _starts_with(path: str, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(prefix)


def _jsonl_rows(path: str):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    with f:
        # lines of a binary file break only at \n, so numbers match what an editor shows
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {json_type(row)}")
            yield f"{path}:{number}", row


def _json_array_rows(path: str):
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}:row {i}: expected a JSON object, got {json_type(row)}")
        yield f"{path}:row {i}", row


def _parquet_rows(path: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})")
    index = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row
            index += 1


def _saved_dataset_rows(path: str):
    if not (Path(path) / "dataset_info.json").is_file() and not (
            Path(path) / "dataset_dict.json").is_file():
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types for a damaged directory
        raise DataError(f"{path}: cannot load the saved dataset ({_one_line(e)})")
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"{path} holds the splits {splits}: give one split's directory, e.g. "
                        f"{os.path.join(path, next(iter(dataset)))}")
    index = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield f"{path}:row {index}", dict(zip(names, values))
            index += 1


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__

