"""What the console scripts share: argparse with vtbench's one-line errors, `run_script` (signal handlers,
bad input as one line and exit 2, interruptions as 130/143) and argparse value types. Exit codes and
error classification live in `harness.errors`."""
from __future__ import annotations

import argparse
import sys

from harness.errors import EXIT_BAD_INPUT, install_signal_handlers, interrupted


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
    from harness.errors import bad_input_errors

    install_signal_handlers(prog)
    try:
        return fn(argv)
    except KeyboardInterrupt as e:
        return interrupted(prog, e, interrupt_note)
    except bad_input_errors() as e:
        from harness.errors import error_line

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


# ---- path and name options: an empty value is never "the default" or "the current directory" ----------
def nonempty(text: str) -> str:
    """Any non-empty text (an empty value of an option is bad input, never a silent default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: empty value")
    return text


def existing_dir(text: str) -> str:
    """A directory that exists (a store to read, a folder of figures): missing or a file is bad input."""
    import os

    nonempty(text)
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r}: not a directory")
    return text


def creatable_dir(text: str) -> str:
    """An output directory: non-empty, a directory if it exists, otherwise creatable (its nearest existing
    ancestor is a writable directory)."""
    import os

    nonempty(text)
    problem = dir_problem(os.path.expanduser(text))
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def default_store(must_exist: bool = True) -> str:
    """The store a script reads when `--store` is not given: `$VTBENCH_STORE`, else `runs/store`. The variable,
    when set, is as explicit as `--store`: empty, a file, or (`must_exist`) a missing folder is bad input naming
    the variable, never "no complete records"."""
    import os

    from harness.config import ConfigError

    from harness.paths import default_store as located

    value = os.environ.get("VTBENCH_STORE")
    if value is None:
        return located()
    path = os.path.expanduser(value)
    if not value.strip():
        raise ConfigError("VTBENCH_STORE='': empty value (unset it for the default runs/store)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"VTBENCH_STORE={value}: exists and is not a directory (the results store is a folder)")
    if must_exist and not os.path.exists(path):
        raise ConfigError(f"VTBENCH_STORE={value}: no such directory")
    return value


def dir_problem(path: str) -> str | None:
    from harness.paths import dir_problem as problem

    return problem(path)


def plain_name(text: str) -> str:
    """A single path component (a report name under --out): not empty, no separator, not '.' or '..'."""
    import os

    nonempty(text)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in text for s in seps) or text.strip() in (".", "..") or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a plain name (no path separator, not '.' or '..')")
    return text


def name_list(text: str) -> list[str]:
    """A comma-separated, non-empty list of names (checked against what is allowed by the caller)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: empty list")
    return items
