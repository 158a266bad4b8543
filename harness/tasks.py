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
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        import os

        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        hint = f" (offline: {'/'.join(offline)} set and the data is not in the Hugging Face cache)" if offline else ""
        raise BenchmarkDataError(f"cannot load data of task {task!r}{hint}: {type(e).__name__}: {first}") from None
    return tm, task_dict
