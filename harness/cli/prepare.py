"""`vtbench-prepare`: make a benchmark's lmms-eval task ready offline and print its include path
(`harness.benchmarks.prepare`); an lmms-eval task's data is loaded (downloaded into the Hugging Face cache), so
data that cannot be had (offline and not cached) is one line and exit 2, with nothing on stdout.

    vtbench-prepare [benchmark=shapes] [data_dir=PATH]      # Hydra-style overrides, as `vtbench`
"""
from __future__ import annotations

import sys

from harness.benchmarks import prepare


def main(argv: list[str] | None = None) -> int:
    from harness.cli.common import run_script

    return run_script("vtbench-prepare", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    from harness.config import compose_config, validate

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):  # Hydra-style overrides; --help is the usage
        print(__doc__)
        return 0
    cfg = compose_config(argv)
    validate(cfg, check_device=False)
    try:
        task, include = prepare.prepare(cfg.benchmark, cfg.data_dir)
        if not cfg.benchmark.get("builtin"):  # an lmms-eval task: its data must load (download or cache) now
            from harness.tasks import _quiet_libraries, load_tasks

            with _quiet_libraries():
                load_tasks(task, include)
    except prepare.BenchmarkDataError as e:
        raise prepare.BenchmarkDataError(f"benchmark={cfg.benchmark.name}: {e}") from None
    if include:  # nothing on stdout when the task needs no include path (built into lmms-eval)
        print(include)
    print(f"# lmms-eval task: {task}" + ("" if include else " (built into lmms-eval: no --include_path needed)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
