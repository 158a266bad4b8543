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


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    # later SIGTERMs while unwinding are ignored: the first one already stops the work
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def install_signal_handlers() -> None:
    """Ctrl-C / SIGINT always interrupts cleanly (even when started from a non-interactive shell that runs
    background jobs with SIGINT ignored) and SIGTERM does the same (exit 143 instead of 130)."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
        pass


def interrupted(prog: str, e: BaseException, what: str = "completed work is kept and the cell resumes on the next run") -> int:
    """Print the one line of an interruption and return its exit code (130 Ctrl-C, 143 SIGTERM)."""
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
