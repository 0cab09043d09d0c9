"""What the command-line tools share: the parser that shows a tool's docstring, launch-size
checks and a free port for launches of their own. (Errors: `megatron_tropd.errors`.)"""

import argparse
import os
import socket

from megatron_tropd.errors import ArgumentParser, UserError


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows a tool's docstring: the first paragraph as the description,
    the rest (the example commands) after the options."""
    first, _, rest = doc.partition("\n\n")
    return ArgumentParser(description=first, epilog=rest,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_parallel_args(parser, what: str = "to run the model at"):
    """A tool's --tensor-model-parallel-size / --tp and --pipeline-model-parallel-size / --pp."""
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, metavar="N",
                        help=f"tensor-parallel size {what} (default 1); must divide the attention "
                             f"and key/value heads")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, metavar="N",
                        help="pipeline-parallel size (default 1); must divide the layers; the "
                             "launch has TP x PP processes (x DP where the tool shards data)")


def world_size() -> int:
    """Processes in this launch (torchrun sets WORLD_SIZE; a plain python run is one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_world_size(expected: int, what: str):
    if world_size() == expected:
        return
    how = (f"`torchrun --nproc-per-node {expected} ...`" if expected > 1
           else "plain python, not torchrun")
    raise UserError(
        f"{what} needs {expected} process(es), this launch has {world_size()}: run it with {how}"
    )


def free_port() -> int:
    """A TCP port free on this host now (for a process group of its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

