"""Path checks shared by the console scripts and config validation (no heavy imports)."""
from __future__ import annotations

import os


def dir_problem(path: str) -> str | None:
    """Why `path` cannot be used as an output directory (None when it can): a file in its place or on its
    way, or a nearest existing ancestor that is not writable."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            return "exists and is not a directory"
        return None if os.access(p, os.W_OK | os.X_OK) else "a directory that is not writable (Permission denied)"
    parent = os.path.dirname(p)
    while parent and not os.path.exists(parent):
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent}: Not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent}: Permission denied"
    return None


def default_store() -> str:
    """The results store every script uses when none is given: `$VTBENCH_STORE`, else `runs/store` (the
    same default as the config's `store.dir`, so `make eval`, `make report` and `make paper` agree)."""
    return os.environ.get("VTBENCH_STORE") or "runs/store"


# ---- atomic writes: every file vtbench writes for a user ------------------------------------------------
# A file is written to a temporary file beside it (`.<name>.<random>.tmp`), flushed and fsynced, then renamed
# over the target (`os.replace`): a reader, a crash or a full disk leaves the old file or the new one, never
# a cut one. Inside `all_or_nothing()` the renames wait until every file of the block is written, so a
# report that fails half-way (a full disk) leaves every previous file byte-identical. An error is an
# `OSError` naming the target path (`e.filename`), with its temporary file removed.
import contextlib as _contextlib
import tempfile as _tempfile
from pathlib import Path as _Path

_STAGES: list[list] = []


def _named(e: OSError, path) -> OSError:
    if getattr(e, "filename", None) == str(path):
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


@_contextlib.contextmanager
def all_or_nothing():
    """Files written by `atomic_write` / `atomic_target` inside this block replace their targets only
    when the whole block succeeds; on any error none does and the temporary files are removed."""
    pending: list = []
    _STAGES.append(pending)
    try:
        yield
    except BaseException:
        _STAGES.remove(pending)
        for tmp, _ in pending:
            with _contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _STAGES.remove(pending)
    if _STAGES:  # nested: the outer block owns the renames
        _STAGES[-1].extend(pending)
        return
    for i, (tmp, path) in enumerate(pending):
        try:
            os.replace(tmp, path)
        except OSError as e:
            for t, _ in pending[i:]:
                with _contextlib.suppress(OSError):
                    os.unlink(t)
            raise _named(e, path) from None


@_contextlib.contextmanager
def atomic_target(path):
    """Yield a temporary path beside `path` to write to (e.g. `fig.savefig(tmp, format=...)`); when the
    block ends without error the file is fsynced and replaces `path` (at once, or at the end of the
    enclosing `all_or_nothing`)."""
    path = _Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise _named(e, path) from None
    try:
        yield _Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        with _contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise
    if _STAGES:
        _STAGES[-1].append((tmp, path))
        return
    try:
        os.replace(tmp, path)
    except OSError as e:
        with _contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _named(e, path) from None


def atomic_write(path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (see above)."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
