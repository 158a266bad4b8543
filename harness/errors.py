"""Errors and exit codes, one module every layer may import: exit codes, the one-line form of an error,
which errors are bad input, and SIGTERM handled like Ctrl-C.

Exit codes (all `vtbench*` scripts):

* 0 — done (for a sweep: every cell complete);
* 1 — a run-time failure (a failed cell; for a sweep: at least one failed cell, named in the last line);
* 2 — bad input (one line `<prog>: error: <key>=<value>: why`; nothing ran, nothing was written);
* 130 — interrupted by Ctrl-C / SIGINT (one line; completed work is kept, the cell resumes);
* 143 — terminated by SIGTERM (128 + 15; what SLURM sends on a time-out or pre-emption): handled
  exactly like Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (so every `except
    KeyboardInterrupt` clean-up path runs and partial answers stay on disk)."""


#: the first interrupting signal of this process (None until one arrives) and whether its line was printed
_SIGNAL: dict = {"first": None, "announced": False, "prog": "vtbench"}


def _on_signal(signum, frame):  # pragma: no cover - exercised through subprocess tests
    """The first SIGINT/SIGTERM raises KeyboardInterrupt / Terminated in the main thread, so every clean-up
    path runs and the partial answers stay on disk. Any later one (a second Ctrl-C while the first unwinds,
    e.g. while `.hydra/` is saved) stops the process at once, with the same one line and exit code as the
    first and no traceback: every answer is already on disk (appended and fsynced per batch), records are
    replaced atomically and cell locks are released by the kernel."""
    first = _SIGNAL["first"]
    if first is None:
        _SIGNAL["first"] = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    exc = Terminated() if first == signal.SIGTERM else KeyboardInterrupt()
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
        pass
    os._exit(interrupted(_SIGNAL["prog"], exc))


def install_signal_handlers(prog: str = "vtbench") -> None:
    """Ctrl-C / SIGINT always interrupts cleanly (even when started from a non-interactive shell that runs
    background jobs with SIGINT ignored) and SIGTERM does the same (exit 143 instead of 130); any number of
    them gives one line (`_on_signal`)."""
    _SIGNAL.update(first=None, announced=False, prog=prog)
    try:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
        pass


def interrupted(prog: str, e: BaseException, what: str = "completed work is kept and the cell resumes on the next run") -> int:
    """Print the one line of an interruption and return its exit code (130 Ctrl-C, 143 SIGTERM); printed once
    per process however many signals arrive."""
    if _SIGNAL["first"] is not None:  # a real signal: its line once, whoever prints it first
        if _SIGNAL["announced"]:
            return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
        _SIGNAL["announced"] = True
    if isinstance(e, Terminated):
        print(f"{prog}: terminated (SIGTERM); {what}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def failure_reason(e: BaseException) -> str:
    """One line naming a run-time failure (`OutOfMemoryError: CUDA out of memory ...`)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def bad_input_errors() -> tuple[type[BaseException], ...]:
    from harness.benchmarks.prepare import BenchmarkDataError
    from harness.config import ConfigError
    from harness.models.adapter import NotApplicable
    from harness.models.loading import ModelLoadError
    from harness.results import StoreError
    from methods import MethodError
    from omegaconf.errors import OmegaConfBaseException  # e.g. an unknown ${resolver:...} in a value

    return (ConfigError, MethodError, NotApplicable, ModelLoadError, BenchmarkDataError, StoreError,
            OmegaConfBaseException)


def error_line(e: BaseException) -> str:
    """The one line shown for a bad-input error (OmegaConf's own messages span several lines)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    if key and key not in line:
        line += f" (in {key})"
    return line
