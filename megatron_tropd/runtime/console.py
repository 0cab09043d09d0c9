"""A quiet console: the known-harmless warnings and log records of megatron-core and torch are
filtered where they arise, by message and module, so that stderr holds our progress lines and the
real problems.

`FILTERED` is the whole list, one row per message with the reason it is harmless. A Python warning
is filtered with `warnings.filterwarnings` (its category, message regex, module regex); a record of
a megatron-core logger with a `logging.Filter` on that one logger matching that one message.

When the filters go in:
  - `install()` runs when the package is imported (megatron_tropd/__init__.py), before any
    megatron-core module is, so warnings raised at import time are covered too, in every process:
    torchrun workers import it again, and so do spawned children, which re-import the main module.
  - The rows marked `cpu_host` (hints about CUDA settings, real advice on a GPU) go in only on a
    host without CUDA, from `configure()`, which the entry points call right after parsing their
    arguments (torch is imported by then; the package import does not need it).

Seeing them all: `TROPD_VERBOSE=1` in the environment makes `install()` and `configure()` install
nothing, in the process and in every process it starts. `--verbose` of the entry points
(`python -m megatron_tropd.train`, `python -m megatron_tropd.evaluate`,
tools/convert_checkpoint.py) makes `configure()` call `show_all()`, which undoes `install()` and
sets TROPD_VERBOSE=1 for the processes started from then on. That is early enough because the
entry points import megatron-core after parsing: importing them warns nothing
(tests/test_quickstart.py checks it), so no filtered warning has passed yet.
"""

import logging
import os
import re
import warnings
from typing import NamedTuple

ENV = "TROPD_VERBOSE"


class Row(NamedTuple):
    """One filtered message. `message` is a regex matched at the start of the message (ignoring
    case, as `warnings.filterwarnings` does). For a warning, `category` is its class and `module`
    a regex of the module it is attributed to; for a log record, `category` is
    `logging.LogRecord` and `module` the name of the logger (the module that logs)."""

    category: type
    message: str
    module: str
    reason: str
    cpu_host: bool = False  # filtered only on a host without CUDA


FILTERED = (
    Row(UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
        r"megatron\.core\.models\.",
        "Apex's fused norm is optional: the local layer spec uses megatron-core's torch norm"),
    Row(UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to ",
        r"megatron\.core\.(optimizer|distributed)\b",
        "fused multi-tensor kernels are optional: megatron-core's torch fallbacks do the same"),
    Row(UserWarning, r"full scope is deprecated\. Use empty cuda_graph_(scope|modules) ",
        r"megatron\.core\.transformer\.transformer_config\Z",
        "megatron-core's own default cuda_graph_scope='full' trips it; we use no CUDA graphs"),
    Row(UserWarning, r"MimoModelConfig is experimental", r"megatron\.core\.models\.mimo\.",
        "megatron-core >= 0.19's optimizer imports the MIMO config; we build no MIMO model"),
    Row(FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions",
        r"megatron\.core\.dist_checkpointing\.strategies\.torch\Z",
        "megatron-core 0.16 loads checkpoints through torch's older DCP entry point; not ours"),
    Row(FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
        r"(megatron_tropd\.runtime\.cpu_compat|torch\.distributed\.checkpoint\.)",
        "megatron-core's dist_checkpointing is built on it (the warning lands on cpu_compat's "
        "torch-function mode on CPU, on torch's DCP planner on GPU)"),
    Row(UserWarning, r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                     r"assuming the intent is to load in a single process",
        r"torch\.distributed\.checkpoint\.",
        "megatron-core >= 0.19 reads each rank's shards with no_dist=True on purpose"),
    Row(UserWarning, r"The argument order of load has been changed",
        r"torch\.distributed\.checkpoint\.",
        "megatron-core >= 0.19 passes DCP load's storage reader positionally; torch accepts it"),
    Row(logging.LogRecord, r"GPTModel IS DEPRECATED", "megatron.core.models.gpt.gpt_model",
        "megatron-core >= 0.19 points to HybridModel; GPTModel, what we build, is maintained"),
    Row(logging.LogRecord, r"MCore's async save is deprecated",
        "megatron.core.dist_checkpointing.strategies.torch",
        "megatron-core >= 0.19's own synchronous save takes that path; we save synchronously"),
    Row(UserWarning, r"When using async grad allreduce it is recommended to set the "
                     r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
        r"megatron\.core\.tensor_parallel\.layers\Z",
        "a CUDA stream setting, meaningless for gloo on CPU (on a GPU it is a real speed hint)",
        cpu_host=True),
)


class _MessageFilter(logging.Filter):
    """Drops the records of one logger whose message matches one row."""

    def __init__(self, row: Row):
        super().__init__()
        self.pattern = re.compile(row.message, re.I)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_LOG_FILTERS = {row: _MessageFilter(row) for row in FILTERED if row.category is logging.LogRecord}


def _verbose_env() -> bool:
    """TROPD_VERBOSE is set (to anything but 0): show every warning."""
    return os.environ.get(ENV, "") not in ("", "0")


def install():
    """Filter the rows that hold on any host, unless TROPD_VERBOSE is set (at package import)."""
    if not _verbose_env():
        _filter(row for row in FILTERED if not row.cpu_host)


def configure(verbose: bool):
    """The entry points' call right after parsing: with `--verbose` show everything
    (`show_all()`); otherwise, on a host without CUDA, filter the `cpu_host` rows too."""
    import torch

    if verbose:
        show_all()
    elif not _verbose_env() and not torch.cuda.is_available():
        _filter(row for row in FILTERED if row.cpu_host)


def show_all():
    """Undo the filters: each row's warning is shown as Python shows it unfiltered (the `default`
    action: once per place), the log filters come off, and TROPD_VERBOSE=1 passes this on to the
    processes started from now on."""
    os.environ[ENV] = "1"
    _filter(FILTERED, shown=True)


def _filter(rows, shown: bool = False):
    for row in rows:
        if row.category is logging.LogRecord:
            logger = logging.getLogger(row.module)
            (logger.removeFilter if shown else logger.addFilter)(_LOG_FILTERS[row])
        else:
            warnings.filterwarnings("default" if shown else "ignore", message=row.message,
                                    category=row.category, module=row.module)
