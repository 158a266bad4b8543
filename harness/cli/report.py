"""`vtbench-report`: comparison tables (md/csv/tex) and figures from the results store (`harness.report`)."""
from __future__ import annotations

import sys

from harness import paper_check, report


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
    ap.add_argument("--paper", default=None, metavar="RECIPE",
                    help="reproduction check: the printed table of RECIPE (conf/printed/RECIPE.json) or `default` "
                         "(the committed results/tables) beside the store's cells; exit 0 iff all within tolerance")
    ap.add_argument("--tolerance", default=None, type=_tolerance,
                    help=f"points of a 0-100 scale (default {paper_check.DEFAULT_TOLERANCE:g}; a row's own printed spread wins)")
    ap.add_argument("--hard-subset", default=None, choices=paper_check.CONTROLS,
                    help="compare methods only on the samples this control gets wrong (per comparison group)")
    args = ap.parse_args(argv)
    args.store = args.store or default_store()
    if args.paper is not None:
        return _paper(ap, args)
    if args.tolerance is not None:
        ap.error("argument --tolerance: only with --paper")
    if args.hard_subset:
        return _hard_subset(args)
    tables, corrupt = report.build_tables(args.store)
    for path, err in corrupt:
        print(f"vtbench-report: warning: skipped corrupt record {path} ({err})", file=sys.stderr)
    if not tables:
        print(f"vtbench-report: no complete records in {args.store}", file=sys.stderr)
        return 1
    written = _write_tables(tables, args)
    print(f"[vtbench-report] wrote {len(written)} files under {args.out}/", file=sys.stderr)
    return 0


def _write_tables(tables, args, prefix: str = "", controls: bool = True) -> list:
    """The comparison tables with the controls' notes (blind) and the baseline's spread, their figures."""
    from pathlib import Path

    spreads = paper_check.baseline_spread(tables)
    paper_check.apply_baseline_spread(tables, spreads)
    if controls:  # on a hard subset, blind is wrong everywhere by construction
        paper_check.apply_blind_notes(tables)
    written = report.write_outputs(tables, args.out, tuple(args.formats), figures=not args.no_figures)
    if controls and not args.no_figures:
        written += paper_check.blind_figure(tables, Path(args.out) / "figures")
    if spreads:
        p = Path(args.out) / "tables" / "baseline_spread.md"
        p.write_text(paper_check.render_spread(spreads))
        written.append(p)
        print(paper_check.render_spread(spreads))
    for group, t in tables.items():
        print(report.render(t, "md", prefix + group.title))
    return written


def _tolerance(text: str) -> float:
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return v


def _paper(ap, args) -> int:
    recipes = paper_check.printed_recipes()
    if args.paper != paper_check.DEFAULT and args.paper not in recipes:
        ap.error(f"argument --paper: {args.paper!r}: no printed table (conf/printed/ has {len(recipes)}: "
                 f"{', '.join(recipes[:3])}, ...; or `{paper_check.DEFAULT}`: the committed results/tables)")
    if args.hard_subset:
        ap.error("argument --hard-subset: not with --paper")
    tol = paper_check.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    from harness.schema import SchemaError

    try:
        status, md, written, done, missing = paper_check.run_check(args.paper, args.store, args.out, tol,
                                                                    figures=not args.no_figures)
    except SchemaError as e:
        print(f"vtbench-report: error: --paper={args.paper}: invalid printed table: {e}", file=sys.stderr)
        return 2
    print(md)
    if not len(done):
        print(f"vtbench-report: nothing to check: no cell of {args.paper!r} is in {args.store}", file=sys.stderr)
    elif status:
        bad = int((~done["within"]).sum())
        why = [f"{bad} of {len(done)} cells outside tolerance"] if bad else []
        if args.paper == paper_check.DEFAULT and len(missing):
            why.append(f"{len(missing)} committed cells missing from the store")
        print(f"vtbench-report: {'; '.join(why)}", file=sys.stderr)
    print(f"[vtbench-report] wrote {len(written)} files under {args.out}/paper_check/", file=sys.stderr)
    return status


def _hard_subset(args) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vtbench-hard-") as tmp:
        info = paper_check.hard_subset_store(args.store, args.hard_subset, tmp)
        if not info:
            print(f"vtbench-report: no comparison group in {args.store} has a {args.hard_subset} cell with "
                  "per-sample scores and a sample it gets wrong", file=sys.stderr)
            return 1
        tables, _ = report.build_tables(tmp)
    renamed = {}
    for g, t in tables.items():
        t.attrs.setdefault("extra_notes", []).append(
            f"Hard subset: only the samples `{args.hard_subset}` gets wrong (in every setting of it), "
            f"so methods are compared where the image matters; n = samples kept.")
        renamed[g._replace(variant=(g.variant + ", " if g.variant else "") + f"hard-{args.hard_subset}")] = t
    written = _write_tables(renamed, args, prefix="Hard subset — ", controls=False)
    print(f"[vtbench-report] wrote {len(written)} files under {args.out}/ (hard subset of {args.hard_subset})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
