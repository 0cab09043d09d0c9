"""Verifiers by name: functions `(response_text, answer) -> correct | wrong | malformed`.

A task names how its responses are checked: `get_verifier(name)` gives the function for a built-in
name (`VERIFIER_NAMES`) or for `module:function`, a user's own (imported on request). Built-ins:

- `addition`: the built-in addition task's verifier (`tasks.verifier.verify`).
- `exact`: normalised string match. The candidate is the contents of the response's last
  `\\boxed{...}` when it has one, else the whole response; both it and the answer are stripped,
  whitespace runs collapsed to one space, case-folded and one trailing period dropped. `malformed`
  when the candidate is empty (an empty response, `\\boxed{}`, or a `\\boxed{` never closed).
- `math`: equivalence as HF's math-verify decides it (LaTeX and numeric: `\\frac{1}{2}`, `0.5` and
  `1/2` agree; intervals, sets, percentages; units are dropped). The response's answer is its last
  `\\boxed{...}` (only that one, so an earlier boxed answer does not count) or, without one, the
  last LaTeX or plain number/expression math-verify finds (boxed first and the first match only,
  as open-r1's and TRL's accuracy rewards, but with math-verify's default LaTeX normalisation and
  unanchored extraction, so that `\\frac12` and a plain `5` count). The gold answer may be bare
  (`\\frac{1}{2}`, `(1, 2]`, `\\{1,2\\}`) or in `$...$`. `malformed` when nothing can be read
  from the response (a `\\boxed{` never closed, LaTeX that does not parse, no number at all) or
  when the check does not finish within `MATH_TIMEOUT_S` (an expression such as `(10^{10})!` keeps
  sympy busy for good).

The math check runs in a worker process, not in the caller: a timeout there holds in any thread
(math-verify's own timeouts use `signal.alarm`, main thread only) and also stops work that a signal
cannot interrupt (a long computation inside C, an exception swallowed by a bare `except`). The
worker is started on first use (its imports do not count against the timeout), killed when a check
overruns, and started again on the next check. Checks from several threads take turns on it.

A verifier never raises for any response text: whatever math-verify makes of it, an error inside
is `malformed` (`math` raises RuntimeError only when its worker process cannot start at all).
"""

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

from megatron_tropd.errors import UserError
from megatron_tropd.tasks.verifier import CORRECT, MALFORMED, WRONG
from megatron_tropd.tasks.verifier import verify as verify_addition

MATH_TIMEOUT_S = 3.0  # per `math` check: extraction and comparison together
_WORKER_START_TIMEOUT_S = 120.0  # its imports (sympy, antlr) are slow on a loaded machine
# Where `megatron_tropd` lives, so that the worker imports this same copy of it.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BOXED = re.compile(r"\\boxed\s*\{")


class VerifierError(UserError):
    """A verifier name that names no verifier (one line, for the command line)."""


def _last_boxed(text: str):
    """Contents of the last `\\boxed{...}` in `text`, '' when it is never closed, None when there is
    none. Braces escaped as `\\{` `\\}` do not count."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[starts[-1]:i]
        i += 1
    return ""


def _normalise(text: str) -> str:
    """`text` stripped, whitespace collapsed, case-folded, one trailing period dropped."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def verify_exact(response_text: str, answer: str) -> str:
    """`exact`: the last `\\boxed{}` contents (else the whole response) equal the answer, both
    normalised."""
    boxed = _last_boxed(response_text)
    candidate = _normalise(response_text if boxed is None else boxed)
    if not candidate:
        return MALFORMED
    return CORRECT if candidate == _normalise(answer) else WRONG


def _math_outcome(response_text: str, answer: str) -> str:
    """The `math` outcome, computed with no time limit (the worker runs it under one)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    boxed = _last_boxed(response_text)
    if boxed is not None and not boxed.strip():
        return MALFORMED
    # Only the last boxed answer is parsed: given several, math-verify would read them as one set.
    text = response_text if boxed is None else "\\boxed{" + boxed + "}"
    # Boxed first, the first match only, as open-r1's and TRL's accuracy rewards; unlike theirs,
    # math-verify's default normalisation (which reads TeX shorthand such as `\frac12`, `\sqrt2`)
    # and unanchored extraction, so that a last plain number or `$...$` counts too.
    response_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # Math-verify's own timeouts are off (None): the worker's caller keeps the time.
    extracted = parse(text, extraction_config=response_config, extraction_mode="first_match",
                      fallback_mode="no_fallback", parsing_timeout=None)
    if not extracted:
        return MALFORMED
    answer = answer.strip()
    if not any(delimiter in answer for delimiter in ("$", "\\boxed", "\\(", "\\[")):
        answer = "\\boxed{" + answer + "}"  # a bare answer is one expression as a whole
    gold = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 extraction_mode="first_match", parsing_timeout=None)
    return CORRECT if verify(gold, extracted, timeout_seconds=None) else WRONG


def _exit_when_orphaned(parent: int):
    """The worker's watchdog thread: end the worker once `parent` is gone (stdin's end of file
    would come only after the check in hand, which may never end)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _serve(parent: int):
    """The worker process of `parent`: one JSON `[response_text, answer]` line in, one outcome
    line out."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills this
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what a library prints goes to stderr, not in among the replies
    # Math-verify warns once that its own timeouts are off; here that is by design.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _math_outcome("\\boxed{1}", "1")  # imports and compiles all before `ready`, outside any check
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            outcome = _math_outcome(*json.loads(line))
        except Exception:
            outcome = MALFORMED
        replies.write(outcome + "\n")
        replies.flush()


class _MathWorker:
    """The worker process that runs the `math` checks, replaced whenever a check overruns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None

    def check(self, response_text: str, answer: str, timeout: float) -> str:
        """The outcome from the worker, or `malformed` when it takes over `timeout` s or dies."""
        # ensure_ascii (the default) keeps the request on one line, whatever the text
        request = json.dumps([response_text, answer]).encode() + b"\n"
        with self._lock:
            # A worker that dies under a request hands it to a fresh one, once: the first may have
            # died before it (killed from outside); if the fresh one dies too, the request did it.
            for _ in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                try:
                    self._proc.stdin.write(request)
                    self._proc.stdin.flush()
                    reply = self._read_line(timeout)
                except OSError:  # the pipe broke: the worker is gone
                    reply = ""
                except BaseException:  # e.g. KeyboardInterrupt: the worker must not run on alone
                    self.close()
                    raise
                if reply in (CORRECT, WRONG, MALFORMED):
                    return reply
                self.close()
                if reply is None:  # out of time: the request is what keeps it busy
                    break
            return MALFORMED

    def close(self, kill: bool = True):
        """Let go of the worker, if there is one: close its pipes and, when `kill`, kill it (not a
        forked child's copy of its parent's worker: that one is the parent's to end)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):  # a request left in a broken pipe cannot be flushed
            proc.stdin.close()
        proc.stdout.close()

    def after_fork(self):
        """In a forked child: a lock of its own, and the parent's worker left to the parent."""
        self._lock = threading.Lock()
        self.close(kill=False)

    def _start(self):
        self.close()
        code = ("import sys\nif sys.argv[1] not in sys.path: sys.path.append(sys.argv[1])\n"
                "from megatron_tropd.tasks.verifiers import _serve\n_serve(int(sys.argv[2]))")
        self._proc = subprocess.Popen([sys.executable, "-c", code, _PACKAGE_ROOT, str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._read_line(_WORKER_START_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError("the math verifier's worker process did not start "
                               "(its error, if any, is on stderr)")

    def _read_line(self, timeout: float):
        """The worker's next reply line, '' when it exits first, None when none comes within
        `timeout` s."""
        deadline = time.monotonic() + timeout
        fd, line = self._proc.stdout.fileno(), b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return ""
            line += chunk
        return line.decode().strip()


_WORKER = _MathWorker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER.after_fork)


def verify_math(response_text: str, answer: str, timeout: float = None) -> str:
    """`math`: math-verify equivalence of the response's answer and `answer`, `malformed` when
    none can be read or the check takes over `timeout` s (default `MATH_TIMEOUT_S`)."""
    return _WORKER.check(response_text, answer, MATH_TIMEOUT_S if timeout is None else timeout)


_BUILT_IN = {"addition": verify_addition, "exact": verify_exact, "math": verify_math}
VERIFIER_NAMES = tuple(sorted(_BUILT_IN))


def get_verifier(name: str):
    """The verifier called `name`: a built-in one (`VERIFIER_NAMES`) or `module:function`."""
    if name == "math" and importlib.util.find_spec("math_verify") is None:
        raise VerifierError("verifier 'math' needs the math-verify package "
                            "(pip install math-verify)")
    if name in _BUILT_IN:
        return _BUILT_IN[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise VerifierError(f"unknown verifier {name!r}: built-in ones are "
                            f"{', '.join(VERIFIER_NAMES)}, or give module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0]
        raise VerifierError(f"verifier {name!r}: cannot import {module_name!r} "
                            f"({type(e).__name__}: {reason})") from None
    if not hasattr(module, attr):
        raise VerifierError(f"verifier {name!r}: module {module_name!r} has no {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise VerifierError(f"verifier {name!r}: {module_name}.{attr} is not callable "
                            f"(it is a {type(fn).__name__})")
    return fn
