"""Reproduction checks: the papers' printed numbers beside the measured ones, the baseline's own spread,
and the controls that show what a benchmark measures (`vtbench-report --paper / --hard-subset`).

Printed tables are data (`conf/printed/<recipe>.json`, one per recipe `conf/experiment/<recipe>.yaml`):
sealed JSON (`harness.schema.dumps_sealed`) checked whenever read (`load_printed`): the schema below,
finite values, known recipe, model, benchmarks, record metrics and methods. Each row carries its paper,
table and the printed line it was copied from. A benchmark says which record metric(s) the paper's number
is (summed: MME perception + cognition), the factor from the record's value to the printed one (`scale`:
100 for a fraction printed in %, 1000 for OCRBench's score out of 1000) and the printed scale's full range
(`full_scale`), so the tolerance is in points of a 0-100 scale whatever the printed unit.

`check_paper(recipe, store)` pairs every printed cell with the store's record of the same model, benchmark,
method label, parameters (the row's, a subset of the record's resolved ones) and budget; `check_committed`
does the same offline against vtbench's own committed tables (`results/tables/*.csv`, whatever cells they
hold), matched by comparison group, method, budget and parameters.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from harness.config import CONF_DIR
from harness.schema import SchemaError, loads_sealed

PRINTED_DIR = CONF_DIR / "printed"
COMMITTED_TABLES = CONF_DIR.parent / "results" / "tables"
#: `--paper default`: vtbench's own committed default table instead of a paper
DEFAULT = "default"
#: tolerance in points of a 0-100 scale (a 200-sample cell moves by 0.5 point per answer)
DEFAULT_TOLERANCE = 1.0

_Strict = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Finite = Annotated[float, Field(allow_inf_nan=False)]


class PrintedBenchmark(BaseModel):
    model_config = _Strict
    printed_as: StrictStr                          # the paper's column and its convention
    metric: Annotated[list[StrictStr], Field(min_length=1)]   # record metrics, summed
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # printed = scale x record value
    full_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # the printed scale's range (100, 1000, 2000...)
    note: StrictStr = ""


class PrintedRow(BaseModel):
    model_config = _Strict
    label: StrictStr
    method: StrictStr                              # the report's method label (`none`, `fastv`, `shortv+fastv`)
    params: dict[str, Any] = {}                    # must equal the record's resolved parameters at these keys
    budget: dict[str, Any] | None = None           # the record's budget ({kind, value}) or None
    values: Annotated[dict[str, Finite], Field(min_length=1)]
    spread: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}  # the paper's own +- (printed units)
    paper: StrictStr
    table: StrictStr
    source: StrictStr                              # the printed line, verbatim


class PrintedTable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    schema_: Literal[1] = Field(alias="schema")
    recipe: StrictStr
    model: StrictStr
    title: StrictStr
    benchmarks: Annotated[dict[str, PrintedBenchmark], Field(min_length=1)]
    rows: Annotated[list[PrintedRow], Field(min_length=1)]
    notes: StrictStr = ""


def printed_recipes() -> list[str]:
    return sorted(p.stem for p in PRINTED_DIR.glob("*.json"))


def _bench_metrics(name: str) -> list[str] | None:
    import yaml

    p = CONF_DIR / "benchmark" / f"{name}.yaml"
    if not p.is_file():
        return None
    cfg = yaml.safe_load(p.read_text()) or {}
    return list(cfg.get("metrics") or [cfg.get("metric")])


def validate_printed(data: Any, recipe: str) -> PrintedTable:
    """The printed table `data` of `recipe`, checked; raises SchemaError (one line)."""
    try:
        t = PrintedTable.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise SchemaError(f"{'.'.join(map(str, err.get('loc', ()))) or 'table'}: {err.get('msg')}") from None
    if t.recipe != recipe:
        raise SchemaError(f"recipe={t.recipe!r} but the file is {recipe}.json")
    if not (CONF_DIR / "experiment" / f"{recipe}.yaml").is_file():
        raise SchemaError(f"recipe={recipe!r}: no conf/experiment/{recipe}.yaml")
    if not (CONF_DIR / "model" / f"{t.model}.yaml").is_file():
        raise SchemaError(f"model={t.model!r}: no conf/model/{t.model}.yaml")
    for name, b in t.benchmarks.items():
        known = _bench_metrics(name)
        if known is None:
            raise SchemaError(f"benchmarks.{name}: no conf/benchmark/{name}.yaml")
        for m in b.metric:
            if m not in known:
                raise SchemaError(f"benchmarks.{name}.metric: {m!r} is not one of the benchmark's metrics {known}")
    from harness.report import _method_order

    methods = set(_method_order())
    for i, r in enumerate(t.rows):
        if r.method not in methods:
            raise SchemaError(f"rows[{i}].method={r.method!r} is not a vtbench method")
        for name in (*r.values, *r.spread):
            if name not in t.benchmarks:
                raise SchemaError(f"rows[{i}]: benchmark {name!r} is not declared in benchmarks")
        if r.budget is not None and (r.budget.get("kind") not in ("tokens", "flops") or not isinstance(r.budget.get("value"), (int, float))):
            raise SchemaError(f"rows[{i}].budget={r.budget!r}: needs kind tokens|flops and a number value")
    return t


def load_printed(recipe: str) -> PrintedTable:
    """`conf/printed/<recipe>.json`, sealed and validated; raises SchemaError / FileNotFoundError."""
    p = PRINTED_DIR / f"{recipe}.json"
    if not p.is_file():
        raise FileNotFoundError(p)
    try:
        return validate_printed(loads_sealed(p.read_bytes()), recipe)
    except SchemaError as e:
        raise SchemaError(f"{p}: {e}") from None


# ---- pairing printed cells with records ------------------------------------------------------------------
def _flat(obj: Any, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def row_matches(row: PrintedRow, rec: dict, model: str, benchmark: str) -> bool:
    from harness.results import _method_label

    cell = rec["cell"]
    if cell["model"]["name"] != model or cell["benchmark"]["name"] != benchmark:
        return False
    if _method_label(cell["method"]) != row.method:
        return False
    got = _flat(rec.get("method_params") or cell["method"].get("params") or {})
    for k, v in _flat(row.params).items():
        if k not in got or not _same(got[k], v):
            return False
    b = cell.get("budget")
    if row.budget is None:
        return not b
    return bool(b) and b.get("kind") == row.budget["kind"] and _same(b.get("value"), row.budget["value"])


def _preference(rec: dict, recipe: str):
    """Among several records of one printed cell: the recipe's own W&B group first, the whole benchmark
    (no limit) next, then the newest."""
    group = ((rec.get("config") or {}).get("logger") or {}).get("group")
    return (group == recipe, rec["cell"].get("limit") is None, rec.get("created") or "")


def measured_value(rec: dict, bench: PrintedBenchmark) -> float | None:
    vals = [(rec.get("metrics") or {}).get(m) for m in bench.metric]
    if any(v is None or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
        return None
    return bench.scale * float(sum(vals))


def complete_records(store_dir: str) -> tuple[list[dict], list[tuple[str, str]]]:
    from harness.results import ResultsStore

    recs, corrupt = [], []
    for path, rec, err in ResultsStore(store_dir).iter_records():
        if rec is None:
            corrupt.append((str(path), err))
        elif rec.get("status") == "complete":
            recs.append(rec)
    return recs, corrupt


def check_paper(recipe: str, store_dir: str, tolerance: float = DEFAULT_TOLERANCE):
    """(checked DataFrame, missing DataFrame, PrintedTable) for `recipe` against the records of the store.
    Tolerance per cell: the paper's own spread where the row gives one, else `tolerance` points of a 0-100
    scale (x full_scale/100 in printed units)."""
    import pandas as pd

    table = load_printed(recipe)
    recs, _ = complete_records(store_dir)
    done, missing = [], []
    for row in table.rows:
        for bench, printed in row.values.items():
            b = table.benchmarks[bench]
            cands = [r for r in recs if row_matches(row, r, table.model, bench)]
            base = {"row": row.label, "method": row.method, "benchmark": bench, "printed_as": b.printed_as,
                    "printed": printed, "paper": row.paper, "table": row.table}
            if not cands:
                missing.append({**base, "why": "no record in the store"})
                continue
            rec = max(cands, key=lambda r: _preference(r, recipe))
            measured = measured_value(rec, b)
            if measured is None:
                missing.append({**base, "why": f"record {rec['key']} lacks metric(s) {'+'.join(b.metric)}"})
                continue
            tol = row.spread.get(bench, tolerance * b.full_scale / 100.0)
            delta = measured - printed
            done.append({**base, "measured": measured, "delta": delta, "delta_points": delta * 100.0 / b.full_scale,
                         "tolerance": tol, "tolerance_source": "paper's spread" if bench in row.spread else "--tolerance",
                         "within": abs(delta) <= tol + 1e-9, "limit": rec["cell"].get("limit"),
                         "n": rec.get("n_samples"), "key": rec["key"]})
    return pd.DataFrame(done), pd.DataFrame(missing), table


# ---- offline: the committed default table ------------------------------------------------------------------
def committed_tables(root: Path = COMMITTED_TABLES) -> dict[str, list[dict]]:
    """{table stem: rows} of every committed comparison table (`results/tables/*.csv`, `#` lines are notes)."""
    out = {}
    for p in sorted(Path(root).glob("*.csv")):
        text = "".join(line for line in p.read_text().splitlines(keepends=True) if not line.startswith("#"))
        rows = list(csv.DictReader(io.StringIO(text)))
        for i, r in enumerate(rows):
            for col in ("method", "budget", "params", "accuracy"):
                if col not in r:
                    raise SchemaError(f"{p}: no column {col!r}")
            try:
                acc = float(r["accuracy"])
            except ValueError:
                raise SchemaError(f"{p}: row {i + 1}: accuracy={r['accuracy']!r} is not a number") from None
            if not math.isfinite(acc):
                raise SchemaError(f"{p}: row {i + 1}: accuracy={r['accuracy']!r} is not finite")
        out[p.stem] = rows
    return out


def check_committed(store_dir: str, tolerance: float = DEFAULT_TOLERANCE, root: Path = COMMITTED_TABLES):
    """(checked, missing) of every committed table's cells against the user's store: same comparison group
    (the table's file stem), method, budget and parameters; accuracy x 100 compared in points."""
    import pandas as pd

    from harness.report import build_tables

    committed = committed_tables(root)
    tables, _ = build_tables(store_dir) if Path(store_dir, "records").is_dir() else ({}, [])
    by_stem = {g.stem: t for g, t in tables.items()}
    done, missing = [], []
    for stem, rows in committed.items():
        mine = by_stem.get(stem)
        for r in rows:
            label = f"{r['method']} · {r['budget']} · {r['params']}"
            base = {"row": label, "method": r["method"], "benchmark": stem, "printed_as": "accuracy (x100)",
                    "printed": 100.0 * float(r["accuracy"]), "paper": "vtbench committed table",
                    "table": f"results/tables/{stem}.csv"}
            hit = None if mine is None else mine[(mine["method"] == r["method"]) & (mine["budget"] == r["budget"])
                                                  & (mine["params"] == r["params"])]
            if hit is None or not len(hit):
                missing.append({**base, "why": "no record in the store"})
                continue
            m = hit.iloc[0]
            measured = 100.0 * float(m["accuracy"])
            delta = measured - base["printed"]
            done.append({**base, "measured": measured, "delta": delta, "delta_points": delta, "tolerance": tolerance,
                         "tolerance_source": "--tolerance", "within": abs(delta) <= tolerance + 1e-9,
                         "limit": None, "n": int(m["n"]) if m["n"] == m["n"] else None, "key": m["key"]})
    return pd.DataFrame(done), pd.DataFrame(missing)


# ---- output -----------------------------------------------------------------------------------------------
CHECK_COLUMNS = [("row", "printed row"), ("benchmark", "benchmark"), ("printed", "printed"), ("measured", "measured"),
                 ("delta", "Δ"), ("tolerance", "tolerance"), ("within", "within"), ("n", "n"), ("key", "record")]


def _v(x) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**NO**"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def render_check(done, missing, title: str, sources: list[str]) -> str:
    out = [f"### Reproduction check — {title}", ""]
    if len(done):
        rows = [[_v(r[c]) if c != "delta" else f"{r['delta']:+.2f}" for c, _ in CHECK_COLUMNS] for _, r in done.iterrows()]
        out += ["| " + " | ".join(h for _, h in CHECK_COLUMNS) + " |", "|" + "---|" * len(CHECK_COLUMNS)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        bad = done[~done["within"]]
        out += ["", f"*{len(done)} cells checked, {len(done) - len(bad)} within tolerance, {len(bad)} outside"
                + (": " + "; ".join(f"{r['row']} on {r['benchmark']} (Δ {r['delta']:+.2f})" for _, r in bad.iterrows()) if len(bad) else "")
                + ".*"]
        partial = done[done["limit"].notna()] if "limit" in done else done.iloc[:0]
        if len(partial):
            out.append(f"*{len(partial)} measured cells are on the first N samples only (run.limit): "
                       "their printed value is for the whole benchmark.*")
    else:
        out.append("*No printed cell has a record in the store.*")
    if len(missing):
        out += ["", f"**Missing cells ({len(missing)}):**", ""]
        out += [f"- {r['row']} on {r['benchmark']} (printed {r['printed']:.2f}): {r['why']}" for _, r in missing.iterrows()]
    out += ["", "*Δ = measured − printed, in the printed unit; tolerance: the paper's own spread where it gives one, "
            "else `--tolerance` points of a 0–100 scale (scaled to the printed unit).* *Sources:* " + "; ".join(sources), ""]
    return "\n".join(out)


def check_figures(done, out_dir: Path, stem: str, title: str) -> list[Path]:
    """One figure per benchmark: measured against printed, the identity line and its tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.report import method_colour, safe_name, save_figure

    written = []
    for bench, g in done.groupby("benchmark", sort=True):
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        lo = float(min(g["printed"].min(), g["measured"].min()))
        hi = float(max(g["printed"].max(), g["measured"].max()))
        pad = max(hi - lo, float(g["tolerance"].max()) * 4, 1e-6) * 0.15
        xs = np.linspace(lo - pad, hi + pad, 2)
        tol = float(g["tolerance"].median())
        ax.plot(xs, xs, color="0.3", lw=0.8, label="measured = printed")
        ax.fill_between(xs, xs - tol, xs + tol, color="0.8", alpha=0.6, label=f"± tolerance ({tol:.3g})")
        for m, gm in g.groupby("method", sort=True):
            ax.scatter(gm["printed"], gm["measured"], color=method_colour(m), label=m, s=28, edgecolor="black", linewidth=0.4)
        out = g[~g["within"]]
        if len(out):  # the cells outside tolerance, named
            ax.scatter(out["printed"], out["measured"], marker="x", color="black", s=70, linewidth=1.4, label="outside tolerance")
            for _, r in out.iterrows():
                ax.annotate(r["row"], (r["printed"], r["measured"]), fontsize=6, xytext=(4, -8), textcoords="offset points")
        ax.set_xlabel(f"printed ({g['printed_as'].iloc[0]})")
        ax.set_ylabel("measured")
        ax.set_title(f"{title}\n{bench}: measured vs printed", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
        written += save_figure(fig, Path(out_dir), safe_name(f"paper_{stem}_{bench}"))
    return written


def write_check(done, missing, out_dir: str, stem: str, title: str, sources: list[str], figures: bool = True) -> list[Path]:
    import pandas as pd

    from harness.paths import atomic_write  # every file vtbench writes for a user is written atomically

    out = Path(out_dir) / "paper_check"
    md = out / f"{stem}.md"
    atomic_write(md, render_check(done, missing, title, sources))
    written = [md]
    csvp = out / f"{stem}.csv"
    atomic_write(csvp, pd.concat([done.assign(status="checked"), missing.assign(status="missing")],
                                 ignore_index=True).to_csv(index=False, float_format="%.6g"))
    written.append(csvp)
    if figures and len(done):
        written += check_figures(done, out / "figures", stem, title)
    return written


def run_check(recipe: str, store_dir: str, out_dir: str, tolerance: float, figures: bool = True):
    """(exit status, markdown, written paths): 0 all checked cells within tolerance, 1 otherwise or when
    nothing could be checked."""
    if recipe == DEFAULT:
        done, missing = check_committed(store_dir, tolerance)
        title = "vtbench's committed default table"
        sources = [f"results/tables/{s}.csv" for s in committed_tables()]
    else:
        done, missing, table = check_paper(recipe, store_dir, tolerance)
        title = f"{table.title} ({recipe})"
        sources = sorted({f"{r.paper}, {r.table}" for r in table.rows})
    written = write_check(done, missing, out_dir, recipe, title, sources, figures)
    md = render_check(done, missing, title, sources)
    ok = len(done) > 0 and bool(done["within"].all())
    if recipe == DEFAULT and len(missing):  # `make paper-check` evaluates every committed cell: one absent is not reproduced
        ok = False
    return (0 if ok else 1), md, written, done, missing


# ---- baseline spread -----------------------------------------------------------------------------------
#: comparison-group fields that the field knows to move the unreduced baseline
PROTOCOL_FIELDS = ("attn_implementation", "batch_size", "chat_template_sha256", "dtype", "prompt", "metric")


def _protocol_split(variant: str) -> tuple[str, str]:
    """(protocol part, the rest) of a report Group.variant such as `batch_size=1, split=test`: the rest must be
    equal for two groups' baselines to measure one protocol spread."""
    proto, rest = [], []
    for part in [p for p in variant.split(", ") if p]:
        (proto if "=" in part and part.split("=", 1)[0] in PROTOCOL_FIELDS else rest).append(part)
    return ", ".join(proto), ", ".join(rest)


def _spread_key(g) -> tuple:
    return (g.model, g.benchmark, g.limit, g.seed, _protocol_split(g.variant)[1])


def baseline_spread(tables: dict) -> dict[tuple, dict]:
    """{(model, benchmark, limit, seed, rest): {"spread", "min", "max", "variants": {protocol: accuracy}}} of
    the `none` cells of groups that differ only by protocol choices (PROTOCOL_FIELDS), where there are two
    or more."""
    by: dict[tuple, dict] = {}
    for g, t in tables.items():
        base = t[t["method"] == "none"]
        if len(base):
            proto = _protocol_split(g.variant)[0] or "(default)"
            by.setdefault(_spread_key(g), {})[proto] = float(base["accuracy"].iloc[0])
    out = {}
    for k, v in by.items():
        if len(v) >= 2:
            out[k] = {"spread": max(v.values()) - min(v.values()), "min": min(v.values()), "max": max(v.values()), "variants": v}
    return out


def apply_baseline_spread(tables: dict, spreads: dict) -> None:
    """Flag, in every comparison table whose baseline has a measured spread, the rows whose difference to
    `none` is smaller than that spread (column `spread_flag`), and say so under the table."""
    for g, t in tables.items():
        s = spreads.get(_spread_key(g))
        if not s:
            continue
        base = t[t["method"] == "none"]
        if not len(base):
            continue
        b = float(base["accuracy"].iloc[0])
        t["spread_flag"] = ["-" if m == "none" else ("≈ within" if abs(a - b) < s["spread"] else "beyond")
                            for m, a in zip(t["method"], t["accuracy"])]
        variants = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(s["variants"].items()))
        t.attrs.setdefault("extra_notes", []).append(
            f"Baseline spread: `none` moves by {s['spread']:.3f} across protocols ({variants}); a difference between "
            f"two rows smaller than {s['spread']:.3f} is within the baseline's own spread (≈ within).")


def render_spread(spreads: dict) -> str:
    if not spreads:
        return ""
    out = ["### Baseline spread (`none` under each protocol)", "", "| model | benchmark | limit | protocol | accuracy |",
           "|---|---|---|---|---|"]
    for (m, b, lim, _s, rest), s in sorted(spreads.items()):
        where = f"{lim}" + (f" ({rest})" if rest else "")
        for var, acc in sorted(s["variants"].items()):
            out.append(f"| {m} | {b} | {where} | {var} | {acc:.3f} |")
        out.append(f"| {m} | {b} | {where} | **spread (max − min)** | **{s['spread']:.3f}** |")
    return "\n".join(out) + "\n"


# ---- controls: blind rows and the hard subset -----------------------------------------------------------
CONTROLS = ("blind", "downsample")


def apply_blind_notes(tables: dict) -> None:
    """Under every table with a `blind` row: how much the model answers without the image."""
    for _g, t in tables.items():
        bl, base = t[t["method"] == "blind"], t[t["method"] == "none"]
        if not len(bl):
            continue
        a = float(bl["accuracy"].iloc[0])
        rel = f" = {a / float(base['accuracy'].iloc[0]):.0%} of `none`" if len(base) and base["accuracy"].iloc[0] else ""
        t.attrs.setdefault("extra_notes", []).append(
            f"Answered without the image (`blind`, no visual token reaches the LLM): {a:.3f}{rel}; a method's "
            "accuracy near this level says little about what it keeps of the image.")


def blind_figure(tables: dict, out_dir: Path) -> list[Path]:
    """One figure per benchmark: `none` and `blind` accuracy ("answered without the image") of every model
    and protocol group that has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.report import method_colour, safe_name, save_figure

    per: dict[str, list] = {}
    for g, t in tables.items():
        bl, base = t[t["method"] == "blind"], t[t["method"] == "none"]
        if len(bl):
            per.setdefault(g.benchmark, []).append((g, float(base["accuracy"].iloc[0]) if len(base) else np.nan,
                                                    float(bl["accuracy"].iloc[0])))
    written = []
    for bench, items in sorted(per.items()):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(items) + 1.5), 3.8))
        x = np.arange(len(items))
        for dx, vals, m, label in ((-0.2, [i[1] for i in items], "none", "none (with the image)"),
                                   (0.2, [i[2] for i in items], "blind", "blind (answered without the image)")):
            bars = ax.bar(x + dx, vals, 0.4, color=method_colour(m), label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(x, [f"{g.model}" + (f"\n{g.variant}" if g.variant else "") + (f"\nlimit {g.limit}" if g.limit not in ("None", "nan") else "")
                          for g, _, _ in items], fontsize=7)
        ax.set_ylabel("accuracy")
        ax.set_title(f"Answered without the image — {bench}", fontsize=9)
        ax.set_ylim(0, max([1e-9] + [v for i in items for v in i[1:] if v == v]) * 1.15)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        written += save_figure(fig, Path(out_dir), safe_name(f"{bench}_answered_without_image"))
    return written


def _score(s: dict, metric: str):
    v = s.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def hard_subset_store(store_dir: str, control: str, dest: str) -> dict[str, dict]:
    """Write to `dest` a store of the records of every comparison group that has a `control` cell,
    restricted to the samples the control gets wrong (score < 1 in every setting of the control; re-sealed
    records, accuracy = the mean over those samples). Returns {group hash: {"n_hard", "n_all", "control"}};
    groups without the control, or whose samples carry no per-sample score, are left out."""
    from harness.results import ResultsStore, comparison_group
    from harness.schema import identity_hash

    recs, _ = complete_records(store_dir)
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(identity_hash(comparison_group(r["cell"])), []).append(r)
    out_store, info = ResultsStore(dest), {}
    from harness.results import _method_label

    for gid, rs in groups.items():
        ctrl = [r for r in rs if _method_label(r["cell"]["method"]) == control]
        if not ctrl:
            continue
        metric = ctrl[0]["primary_metric"]
        if any(r["primary_metric"] != metric for r in rs):
            continue
        wrong = None
        for c in ctrl:
            scores = {s["doc_id"]: _score(s, metric) for s in c["samples"]}
            if any(v is None for v in scores.values()):
                wrong = None
                break
            ids = {i for i, v in scores.items() if v < 1.0}
            wrong = ids if wrong is None else wrong & ids
        if not wrong:
            continue
        for r in rs:
            samples = [s for s in r["samples"] if s["doc_id"] in wrong]
            if not samples or any(_score(s, metric) is None for s in samples):
                continue
            acc = sum(_score(s, metric) for s in samples) / len(samples)
            keep = {str(s["doc_id"]) for s in samples}
            new = {**r, "samples": samples, "n_samples": len(samples), "accuracy": acc, "metrics": {metric: acc},
                   "n_empty": sum(not s["prediction"] for s in samples),
                   "failures": {k: v for k, v in (r.get("failures") or {}).items() if k in keep}}
            new["n_failed"] = len(new["failures"])
            for f in ("n_nonfinite", "nonfinite", "asked_recall"):
                new.pop(f, None)
            out_store.write(new)
        info[gid] = {"n_hard": len(wrong), "n_all": len(ctrl[0]["samples"]), "control": control}
    return info
