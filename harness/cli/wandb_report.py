"""`vtbench-wandb-report`: one W&B report run with a sweep's comparison tables and figures (`harness.wandb_report`)."""
from __future__ import annotations

import os
import sys

from harness import wandb_report


def main(argv: list[str] | None = None) -> int:
    from harness.cli.common import run_script

    return run_script("vtbench-wandb-report", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    from harness.cli.common import default_store
    from harness.cli.common import ArgumentParser, creatable_dir, existing_dir, nonempty

    ap = ArgumentParser(prog="vtbench-wandb-report", description=wandb_report.__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, type=existing_dir,
                    help="results store (default: $VTBENCH_STORE or runs/store)")
    ap.add_argument("--group", default=None, type=nonempty, help="the sweep's W&B group (its cells' logger.group); default: all")
    ap.add_argument("--figures", action="append", default=[], type=existing_dir, metavar="DIR", help="also log the PNGs of DIR")
    ap.add_argument("--project", default="vtbench", type=nonempty)
    ap.add_argument("--entity", default=None, type=nonempty)
    ap.add_argument("--mode", default="offline", choices=("offline", "online", "disabled"))
    ap.add_argument("--dir", default=None, type=creatable_dir,
                    help="W&B run folder (default: $VTBENCH_WANDB_DIR or runs)")
    args = ap.parse_args(argv)
    args.store = args.store or default_store()
    args.dir = args.dir or os.environ.get("VTBENCH_WANDB_DIR") or "runs"
    from harness.cli.common import dir_problem

    if problem := dir_problem(os.path.expanduser(args.dir)):  # $VTBENCH_WANDB_DIR, checked like --dir
        ap.error(f"argument --dir: {args.dir!r}: {problem}")
    info = wandb_report.log_report(args.store, args.group, args.figures, project=args.project, entity=args.entity,
                      mode=args.mode, wandb_dir=args.dir)
    if info is None:
        what = f" in group {args.group!r}" if args.group else ""
        print(f"vtbench-wandb-report: no complete records{what} in {args.store}", file=sys.stderr)
        return 1
    print(f"[vtbench-wandb-report] {info['mode']} run {info['run_id']}: {len(info['tables'])} tables, "
          f"{len(info['figures'])} figures ({info['dir']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
