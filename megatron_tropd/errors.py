"""The one error type a person running a command is told about, and how every command tells it.

A `UserError` is bad input they can fix (a flag, a data line, a checkpoint, a launch layout) or a
run condition they can act on (too many non-finite steps in a row). Every entry point and tool
runs its main through `run_main`, which reports one as a single line `error: <message>` on stderr
and exit status 2 (argparse's own status for a bad flag, which `ArgumentParser` reports the same
way); any other exception is a bug and keeps its traceback. Subclasses exist where a caller tells
them apart (to add context, or to test which check fired).
"""

import argparse
import sys

EXIT_STATUS = 2


class UserError(Exception):
    """Bad input or an actionable run condition, in one line that names what is wrong."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, invalid choice, missing value) as the one line every
    other error is, without the usage block."""

    def error(self, message):
        self.exit(EXIT_STATUS, f"error: {message} (see --help)\n")


def run_main(main, *args, **kwargs):
    """`main(*args, **kwargs)`, with a `UserError` reported as `error: <message>` and exit
    status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STATUS)
