"""`vtbench-prepare`: make a benchmark's lmms-eval task ready offline and print its include path
(`harness.benchmarks.prepare`).

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
    task, include = prepare.prepare(cfg.benchmark, cfg.data_dir)
    print(include or "")
    print(f"# lmms-eval task: {task}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
