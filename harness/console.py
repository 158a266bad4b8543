"""What every console script shares: exit codes, one-line errors, and SIGTERM handled like Ctrl-C.

Exit codes (all `vtbench*` scripts):

* 0 — done (for a sweep: every cell complete);
* 1 — a run-time failure (a failed cell; for a sweep: at least one failed cell, named in the last line);
* 2 — bad input (one line `<prog>: error: <key>=<value>: why`; nothing ran, nothing was written);
* 130 — interrupted by Ctrl-C / SIGINT (one line; completed work is kept, the cell resumes);
* 143 — terminated by SIGTERM (128 + 15; what SLURM sends on a time-out or pre-emption): handled
  exactly like Ctrl-C.
"""
from __future__ import annotations

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with vtbench's error convention: one line `<prog>: error: <why>`, exit 2 (argparse's own
    prints the usage first, two lines or more)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'} (--help for usage)",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)


def run_script(prog: str, fn, argv=None, *, interrupt_note: str = "nothing is lost; rerun the same command") -> int:
    """Run a console script's `fn(argv) -> int` with vtbench's conventions: signal handlers installed,
    bad-input errors (including a ValueError from a malformed number) as one line and exit 2,
    interruptions as one line and 130/143."""
    from harness.cli import bad_input_errors

    install_signal_handlers()
    try:
        return fn(argv)
    except KeyboardInterrupt as e:
        return interrupted(prog, e, interrupt_note)
    except bad_input_errors() as e:
        from harness.cli import error_line

        print(f"{prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except OSError as e:  # an output folder that cannot be written (like an unwritable store: bad input)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


# ---- argparse value types: a bad value is one line naming the option's value, exit 2 -----------------------
def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lo:
        raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
    return value


def choices_list(allowed) -> callable:
    """A comma-separated subset of `allowed` (e.g. `--formats md,csv`)."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return items

    return parse
