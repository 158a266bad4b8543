"""`vtbench-report`: comparison tables (md/csv/tex) and figures from the results store (`harness.report`)."""
from __future__ import annotations

import sys

from harness import report


def main(argv: list[str] | None = None) -> int:
    from harness.cli.common import run_script

    return run_script("vtbench-report", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    from harness.cli.common import default_store
    from harness.cli.common import ArgumentParser, choices_list, creatable_dir, existing_dir

    ap = ArgumentParser(prog="vtbench-report", description=report.__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, type=existing_dir,
                    help="results store (default: $VTBENCH_STORE or runs/store)")
    ap.add_argument("--out", default="results", type=creatable_dir)
    ap.add_argument("--formats", default="md,csv,tex", type=choices_list(("md", "csv", "tex")))
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    args.store = args.store or default_store()
    tables, corrupt = report.build_tables(args.store)
    for path, err in corrupt:
        print(f"vtbench-report: warning: skipped corrupt record {path} ({err})", file=sys.stderr)
    if not tables:
        print(f"vtbench-report: no complete records in {args.store}", file=sys.stderr)
        return 1
    written = report.write_outputs(tables, args.out, tuple(args.formats), figures=not args.no_figures)
    for group, t in tables.items():
        print(report.render(t, "md", group.title))
    print(f"[vtbench-report] wrote {len(written)} files under {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
