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
