"""lmms-eval tasks for the engine: `load_tasks` builds a task's objects (loading its data, so a missing
dataset fails before any model loads) and `_quiet_libraries` keeps lmms-eval, datasets and
transformers at warning level while they work. Used by the cell runner and the calibration."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager


@contextmanager
def _quiet_libraries():
    """lmms-eval/datasets/transformers are chatty at INFO level; keep warnings and errors."""
    from loguru import logger as loguru_logger

    import datasets

    loguru_logger.remove()
    hid = loguru_logger.add(sys.stderr, level="WARNING")
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    old = {n: logging.getLogger(n).level for n in ("datasets", "transformers", "lmms-eval")}
    for n in old:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        loguru_logger.remove(hid)
        if bars:
            datasets.enable_progress_bars()
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def load_tasks(task: str, include_path: str | None):
    """Build lmms-eval's task objects (this loads the benchmark data: a missing dataset fails here,
    before any model is loaded)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from harness.benchmarks.prepare import BenchmarkDataError

    from harness.paths import dir_problem

    if problem := dir_problem(datasets_cache_folder()[0]):  # the environment, found before lmms-eval's retries
        raise BenchmarkDataError(f"cannot load data of task {task!r}: {_cache_folder_problem(problem=problem)}")
    tm = TaskManager(verbosity="WARNING", include_path=include_path, include_defaults=include_path is None)
    if task not in tm.all_tasks:
        raise BenchmarkDataError(f"lmms-eval has no task {task!r}")
    try:
        task_dict = get_task_dict([task], tm)
    except Exception as e:  # datasets raise many types (ConnectionError, FileNotFoundError, ArrowInvalid...)
        cause = root_cause(e)
        if isinstance(cause, OSError) and cause.errno in _UNWRITABLE:  # the environment's folders, not the network
            raise BenchmarkDataError(f"cannot load data of task {task!r}: {_cache_folder_problem(cause)}") from None
        raise BenchmarkDataError(data_error_line(task, e)) from None
    return tm, task_dict


import errno as _errno

#: errors of a folder that cannot be written (read-only, a file in the way, full), as opposed to data not found
_UNWRITABLE = {_errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.ENOTDIR, _errno.EEXIST, _errno.ENOSPC, _errno.EDQUOT}


def root_cause(e: BaseException) -> BaseException:
    """The failure behind wrappers: tenacity's `RetryError` (its last attempt's exception, as the hub
    client's retries raise it) and exception chains (`raise ... from`, and the context of a raise inside
    `except`)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        last = getattr(e, "last_attempt", None)
        inner = last.exception() if last is not None and hasattr(last, "exception") else None
        inner = inner or e.__cause__ or e.__context__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def data_error_line(task: str, e: BaseException) -> str:
    """One line naming the benchmark's task and why its data did not load: offline and not cached (what to
    change: go online once, or point the Hugging Face cache at a copy), or the underlying error's first line."""
    import os

    cause = root_cause(e)
    text = str(cause).strip()
    first = text.splitlines()[0] if text else ""
    what = f"{type(cause).__name__}: {first}".rstrip(": ")
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
    if offline:
        return (f"benchmark.task={task}: the data is not in the Hugging Face cache and {'/'.join(offline)} forbid "
                f"downloading it (set {'=0 '.join(offline)}=0 once to download and cache it; {what})")
    return f"benchmark.task={task}: cannot load the data: {what}"


def datasets_cache_folder() -> tuple[str, str]:
    """`(folder, the variable that places it)` of the datasets cache lmms-eval loads into, resolved as lmms-eval
    resolves it (LMMS_EVAL_DATASETS_CACHE, HF_DATASETS_CACHE, HF_HOME/datasets, ~/.cache/huggingface/datasets)."""
    import os

    for var in ("LMMS_EVAL_DATASETS_CACHE", "HF_DATASETS_CACHE"):
        if os.environ.get(var, "").strip():
            return os.path.expanduser(os.environ[var].strip()), var
    if os.environ.get("HF_HOME", "").strip():
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "datasets"), "HF_HOME"
    home = os.environ.get("HOME")
    return os.path.expanduser("~/.cache/huggingface/datasets"), f"HOME={home}" if home is not None else "HOME (unset)"


def _cache_folder_problem(e: OSError | None = None, problem: str | None = None) -> str:
    """One line naming the folder (and the variable that places it) a dataset load cannot write."""
    folder, var = datasets_cache_folder()
    if problem is None:
        problem = f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else "")
    return (f"the datasets cache folder {folder} (from {var}) cannot be written: {problem}; "
            "point HF_DATASETS_CACHE (or HF_HOME) at a writable folder")
