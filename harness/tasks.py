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

    tm = TaskManager(verbosity="WARNING", include_path=include_path, include_defaults=include_path is None)
    if task not in tm.all_tasks:
        raise BenchmarkDataError(f"lmms-eval has no task {task!r}")
    try:
        task_dict = get_task_dict([task], tm)
    except Exception as e:  # datasets raise many types (ConnectionError, FileNotFoundError, ArrowInvalid...)
        raise BenchmarkDataError(data_error_line(task, e)) from None
    return tm, task_dict


def root_cause(e: BaseException) -> BaseException:
    """The failure behind wrappers: tenacity's `RetryError` (its last attempt's exception, as the hub
    client's retries raise it) and explicit `raise ... from` causes."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        last = getattr(e, "last_attempt", None)
        inner = last.exception() if last is not None and hasattr(last, "exception") else None
        inner = inner or e.__cause__
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
