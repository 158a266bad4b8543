"""One W&B report run per sweep (comparison tables and figures), logged by `vtbench-wandb-report`.

    vtbench-wandb-report [--store DIR (default: $VTBENCH_STORE or runs/store)] [--group NAME]
                         [--figures DIR ...] [--project vtbench] [--mode offline] [--dir runs]

Reads the results store, builds the comparison tables of `vtbench-report` (`harness.report.build_tables`)
and their figures (`harness.report.write_outputs`, written to a temporary folder), and logs them as one
W&B run with `job_type="report"` in group `--group` (the sweep's name: the `logger.group` its cells were
logged with, e.g. `experiment=repro_shortv_llava15_7b` sets `logger.group: repro_shortv_llava15_7b`).
With `--group`, only the records whose cells were logged in that group are reported; without it, the
whole store (group `report`). `--figures DIR` adds every PNG of DIR (e.g. `results/paper/figures`).
Offline by default (`WANDB_MODE` or `--mode online` with credentials to upload; `wandb sync` later).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def records_in_group(store_dir: str, group: str | None) -> set[str] | None:
    """Keys of the complete records whose cell was logged in W&B group `group` (None: no filter)."""
    if group is None:
        return None
    from harness.results import ResultsStore

    keys = set()
    for _, rec, _ in ResultsStore(store_dir).iter_records():
        if rec and rec.get("status") == "complete":
            logger = (rec.get("config") or {}).get("logger") or {}
            if logger.get("group") == group:
                keys.add(rec["key"])
    return keys


def collect(store_dir: str, group: str | None):
    """{report Group: DataFrame} (like-for-like comparisons) restricted to `group`'s records."""
    from harness.report import build_tables

    tables, corrupt = build_tables(store_dir)
    for path, err in corrupt:
        print(f"vtbench-wandb-report: warning: skipped corrupt record {path} ({err})", file=sys.stderr)
    keys = records_in_group(store_dir, group)
    if keys is not None:
        tables = {k: t[t["key"].isin(keys)].reset_index(drop=True) for k, t in tables.items()}
        tables = {k: t for k, t in tables.items() if len(t)}
    return tables


def typed_table(wandb, t):
    """The comparison table with typed columns: numbers as numbers (None where missing; counted prefill
    FLOPs as `gflops`, latency quartiles beside the medians), the method, its budget and parameters as
    strings, and the record key."""
    import math

    from pandas.api.types import is_numeric_dtype

    from harness.report import COLUMNS, CSV_EXTRA

    cols = [c for c, _ in COLUMNS if c in t.columns] + [c for c in CSV_EXTRA if c in t.columns]
    numeric = {c for c in cols if is_numeric_dtype(t[c]) and t[c].dtype != bool}

    def cell(v, c):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return float(v) if c in numeric else str(v)

    from wandb.sdk.data_types import _dtypes

    dtype = [_dtypes.OptionalType(float if c in numeric else str) for c in cols]  # None where missing
    return wandb.Table(columns=cols, data=[[cell(r[c], c) for c in cols] for _, r in t.iterrows()], dtype=dtype)


def charts(wandb, table, group) -> dict:
    """Native W&B charts of one comparison: accuracy vs counted prefill GFLOPs and vs prefill latency,
    one line per method through its budgets (`wandb.plot.line_series`), plus a scatter of every cell."""
    import collections

    rows = [dict(zip(table.columns, r)) for r in table.data]
    out = {}
    for x, label in (("gflops", "prefill GFLOPs (counted)"), ("prefill_ms", "prefill latency (ms)")):
        by = collections.defaultdict(list)
        for r in rows:
            if r.get(x) is not None and r.get("accuracy") is not None:
                by[r["method"]].append((r[x], r["accuracy"]))
        if not by:
            continue
        methods = sorted(by)
        pts = [sorted(by[m]) for m in methods]
        out[f"chart/{group.stem}/accuracy_vs_{x}"] = wandb.plot.line_series(
            xs=[[p[0] for p in ps] for ps in pts], ys=[[p[1] for p in ps] for ps in pts], keys=methods,
            title=f"Accuracy vs {label} — {group.title}", xname=label)
        out[f"chart/{group.stem}/accuracy_vs_{x}_cells"] = wandb.plot.scatter(
            table, x, "accuracy", title=f"Accuracy vs {label}, every cell — {group.title}")
    return out


def _log_paper_check(run, wandb, store_dir: str, group: str | None) -> list[str]:
    """The reproduction check of `vtbench-report --paper` when the sweep's group is a recipe with a printed
    table (conf/printed/<group>.json): printed vs measured, Δ, tolerance and missing cells, one W&B table."""
    from harness import paper_check

    if not group or group not in paper_check.printed_recipes():
        return []
    import pandas as pd

    done, missing, _ = paper_check.check_paper(group, store_dir)
    both = pd.concat([done.assign(status="checked"), missing.assign(status="missing")], ignore_index=True)
    cols = [c for c in ("row", "method", "benchmark", "printed_as", "printed", "measured", "delta", "tolerance",
                        "within", "status", "why", "paper", "table", "key") if c in both.columns]
    data = [[None if (isinstance(v, float) and v != v) else (v if isinstance(v, (int, float, bool)) else str(v))
             for v in r] for r in both[cols].itertuples(index=False)]
    key = f"paper_check/{group}"
    run.log({key: wandb.Table(columns=cols, data=data, allow_mixed_types=True)})
    run.summary.update({"paper_check_within": bool(len(done)) and bool(done["within"].all()),
                        "paper_check_cells": len(done), "paper_check_missing": len(missing)})
    return [key]


def log_report(store_dir: str, group: str | None = None, figure_dirs: list[str] | None = None, *,
               project: str = "vtbench", entity: str | None = None, mode: str = "offline",
               wandb_dir: str = "runs") -> dict | None:
    """Log the report run; returns {"run_id", "dir", "mode", "tables", "figures"} or None without records."""
    from harness.report import write_outputs
    from harness.wandb_log import effective_mode, store_table_in_run

    tables = collect(store_dir, group)
    if not tables:
        return None
    mode = effective_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    wdir = os.path.expanduser(wandb_dir)
    os.makedirs(wdir, exist_ok=True)
    name = group or "report"
    run = wandb.init(project=project, entity=entity, name=f"report-{name}", group=name, job_type="report",
                     dir=wdir, mode=mode, reinit="finish_previous",
                     config={"store": str(store_dir), "group": group, "n_tables": len(tables),
                             "n_cells": int(sum(len(t) for t in tables.values()))})
    logged_tables, logged_figs, stored = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_outputs(tables, tmp, formats=("md",), figures=True)
        for group, t in sorted(tables.items()):
            key = f"table/{group.stem}"
            table = typed_table(wandb, t)
            run.log({key: table, **charts(wandb, table, group)})
            # with its column types in the run folder too (W&B keeps those only in a staged artifact)
            stored[key] = store_table_in_run(wandb, run, typed_table(wandb, t), f"table_{group.stem}")
            logged_tables.append(key)
        pngs = [p for p in paths if p.suffix == ".png"]
        for d in figure_dirs or []:
            pngs += sorted(Path(d).glob("*.png"))
        for p in pngs:
            key = f"figures/{p.stem}"
            run.log({key: wandb.Image(str(p), caption=p.stem)})
            logged_figs.append(key)
        logged_tables += _log_paper_check(run, wandb, store_dir, name)  # `group` is the loop's by now
        md = "\n".join(p.read_text() for p in paths if p.suffix == ".md")
        run.summary.update({"n_cells": int(sum(len(t) for t in tables.values())), "tables": logged_tables,
                            "figures": logged_figs, "comparison_markdown": md})
    info = {"run_id": run.id, "dir": run.dir, "mode": mode, "tables": logged_tables, "figures": logged_figs,
            "stored_tables": stored}
    run.finish()
    return info
