"""`vtbench-report`: comparison tables and figures from the results store (pandas + matplotlib).

    vtbench-report [--store runs/store] [--out results] [--formats md,csv,tex]

Per (model, benchmark): one row per cell with accuracy, retention vs `none` (same model, benchmark,
limit and seed), counted FLOPs (T and ratio to `none`), prefill latency, decode latency per token, peak
memory, KV-cache bytes and visual tokens reaching the LLM, plus a paired comparison with `none` on the
same samples (agreement rate of the predictions and a bootstrap 95 % CI of the accuracy difference).
Tables go to `<out>/tables/` as Markdown, CSV and LaTeX with the counting conventions printed under
each; figures (accuracy vs FLOPs Pareto, retention vs FLOPs budget, latency breakdown) to
`<out>/figures/` as PNG and PDF. Output depends only on the records (no timestamps), so committed
tables are exactly what this command regenerates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

CONVENTIONS = (
    "FLOPs = 2 x multiply-accumulates of matrix products (linear layers, attention QK^T and AV, "
    "convolutions), counted with fvcore on the patched model (attention added back; element-wise ops not "
    "counted); prefill = vision encoder + projector + LLM over the prompt + LM head on the last position, "
    "mean over the probe samples. Latency: median over repeats on the probe set "
    "(time to first token; decode per token). Memory: peak increase during the timed runs "
    "(GPU allocator on GPU, process RSS on CPU). Retention = accuracy / accuracy of `none`. "
    "Agreement = share of samples whose prediction equals `none`'s; CI = paired bootstrap 95 % interval "
    "of the accuracy difference (2000 resamples, seed 0)."
)

COLUMNS = [
    ("method", "method"),
    ("budget", "budget"),
    ("params", "params"),
    ("visual_tokens_llm", "visual tokens→LLM"),
    ("visual_tokens_layer", "visual tokens/layer"),
    ("accuracy", "accuracy"),
    ("retention", "retention"),
    ("agreement", "agree w/ none"),
    ("diff_ci", "Δacc 95% CI"),
    ("gflops", "prefill GFLOPs"),
    ("flops_ratio", "FLOPs ratio"),
    ("prefill_ms", "prefill ms"),
    ("decode_ms", "decode ms/tok"),
    ("peak_mem_mb", "peak mem MB"),
    ("kv_mb", "KV cache MB"),
    ("n", "n"),
]

# record fields (flattened by harness.results.record_row)
F_TOTAL = "efficiency.flops.prefill.total"
F_PREFILL_MS = "efficiency.latency.prefill_ms.median"
F_DECODE_MS = "efficiency.latency.decode_ms_per_token.median"
F_PEAK = "efficiency.memory.peak_delta_bytes"
F_KV = "efficiency.kv_cache_bytes"
F_VIS = "efficiency.visual_tokens_llm"
F_VIS_LAYER = "efficiency.visual_tokens_mean_per_layer"


def paired_stats(a: list[dict], b: list[dict], metric: str, *, iters: int = 2000, seed: int = 0) -> dict:
    """Agreement and bootstrap CI of mean(score_a - score_b) over the samples both records share."""
    sa = {s["doc_id"]: s for s in a}
    sb = {s["doc_id"]: s for s in b}
    ids = sorted(set(sa) & set(sb))
    if not ids:
        return {"n_paired": 0, "agreement": None, "diff": None, "ci_low": None, "ci_high": None}
    agree = np.mean([sa[i]["prediction"].strip().lower() == sb[i]["prediction"].strip().lower() for i in ids])
    d = np.array([float(sa[i].get(metric, 0.0)) - float(sb[i].get(metric, 0.0)) for i in ids])
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"n_paired": len(ids), "agreement": float(agree), "diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def _records(store_dir: str):
    from harness.results import ResultsStore

    store = ResultsStore(store_dir)
    out, corrupt = {}, []
    for path, rec, err in store.iter_records():
        if rec is None:
            corrupt.append((str(path), err))
        elif rec.get("status") == "complete":
            out[rec["key"]] = rec
    return out, corrupt


def build_tables(store_dir: str):
    """{(model, benchmark): DataFrame} plus the list of corrupt records skipped."""
    import pandas as pd

    from harness.results import load

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load(store_dir)
    recs, corrupt = _records(store_dir)
    tables = {}
    if df.empty:
        return tables, corrupt
    group_cols = ["model", "benchmark", "limit", "seed"]
    for gkey, g in df.groupby(group_cols, dropna=False, sort=True):
        base = g[g["method"] == "none"]
        base_row = base.iloc[0] if len(base) else None
        base_rec = recs.get(base_row["key"]) if base_row is not None else None
        rows = []
        for _, r in g.iterrows():
            rec = recs[r["key"]]
            params = json.loads(r["method_params"]) if r["method_params"] else {}
            row = {
                "method": r["method"],
                "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-",
                "accuracy": r["accuracy"],
                "n": r["n_samples"],
                "budget": _budget_label(r.get("budget")),
                "visual_tokens_llm": r.get(F_VIS),
                "visual_tokens_layer": r.get(F_VIS_LAYER),
                "gflops": (r.get(F_TOTAL) or np.nan) / 1e9 if r.get(F_TOTAL) == r.get(F_TOTAL) else np.nan,  # noqa: PLR0124
                "prefill_ms": r.get(F_PREFILL_MS),
                "decode_ms": r.get(F_DECODE_MS),
                "peak_mem_mb": (r.get(F_PEAK) or np.nan) / 2**20 if r.get(F_PEAK) is not None else np.nan,
                "kv_mb": (r.get(F_KV) or np.nan) / 2**20 if r.get(F_KV) is not None else np.nan,
                "key": r["key"],
            }
            if base_row is not None:
                row["retention"] = r["accuracy"] / base_row["accuracy"] if base_row["accuracy"] else np.nan
                bt = base_row.get(F_TOTAL)
                row["flops_ratio"] = (r.get(F_TOTAL) / bt) if bt and r.get(F_TOTAL) is not None else np.nan
                ps = paired_stats(rec.get("samples", []), base_rec.get("samples", []), rec.get("primary_metric") or "exact_match")
                row["agreement"] = ps["agreement"]
                row["diff_ci"] = (
                    f"{ps['diff']:+.3f} [{ps['ci_low']:+.3f}, {ps['ci_high']:+.3f}]" if ps["diff"] is not None else "-"
                )
            rows.append(row)
        t = pd.DataFrame(rows)
        t["_order"] = [(m != "none", m, -_budget_value(b), p) for m, b, p in zip(t["method"], t["budget"], t["params"])]
        t = t.sort_values("_order").drop(columns="_order")
        tables[tuple(str(x) for x in gkey)] = t.reset_index(drop=True)
    return tables, corrupt


def _budget_label(raw) -> str:
    if not raw or raw != raw:
        return "-"
    b = json.loads(raw) if isinstance(raw, str) else raw
    if not b:
        return "-"
    unit = "tokens" if b["kind"] == "tokens" else "FLOPs"
    v = b["value"]
    return f"{v:g} {unit}" if v > 1 else f"{100 * v:g}% {unit}"


def _budget_value(label: str) -> float:
    try:
        num = label.split()[0]
        return float(num[:-1]) / 100 if num.endswith("%") else float(num)
    except (ValueError, IndexError, AttributeError):
        return 2.0  # no budget: the method's own parameters first


def _fmt(v, col):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if col in ("accuracy", "retention", "agreement", "flops_ratio"):
        return f"{v:.3f}"
    if col in ("gflops",):
        return f"{v:.4g}"
    if col in ("prefill_ms", "decode_ms", "peak_mem_mb", "kv_mb"):
        return f"{v:.1f}"
    if col == "visual_tokens_layer":
        return f"{v:.1f}"
    if col in ("visual_tokens_llm", "n"):
        return f"{v:.0f}" if isinstance(v, (int, float)) else str(v)
    return str(v)


def render(t, fmt: str, title: str) -> str:
    cols = [(c, h) for c, h in COLUMNS if c in t.columns]
    cells = [[_fmt(r[c], c) for c, _ in cols] for _, r in t.iterrows()]
    heads = [h for _, h in cols]
    if fmt == "md":
        out = [f"### {title}", "", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        out += ["", f"*Counting conventions:* {CONVENTIONS}", ""]
        return "\n".join(out)
    if fmt == "tex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("→", r"$\to$").replace("Δ", r"$\Delta$")  # noqa: E731
        out = [r"\begin{table}[t]", r"\centering\small", r"\begin{tabular}{" + "l" * 2 + "r" * (len(heads) - 2) + "}",
               r"\toprule", " & ".join(esc(h) for h in heads) + r" \\", r"\midrule"]
        out += [" & ".join(esc(c) for c in row) + r" \\" for row in cells]
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(title)}. {esc(CONVENTIONS)}}}", r"\end{table}", ""]
        return "\n".join(out)
    raise ValueError(fmt)


def write_outputs(tables: dict, out_dir: str, formats=("md", "csv", "tex"), figures: bool = True) -> list[Path]:
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = []
    for (model, bench, limit, seed), t in tables.items():
        stem = f"{model}_{bench}" + (f"_limit{limit}" if limit not in ("None", "nan") else "") + (f"_seed{seed}" if seed != "0" else "")
        title = f"{bench} on {model}" + (f" (first {limit} samples)" if limit not in ("None", "nan") else "")
        for fmt in formats:
            p = out / "tables" / f"{stem}.{fmt}"
            if fmt == "csv":
                cols = [c for c, _ in COLUMNS if c in t.columns] + ["key"]
                text = t[cols].to_csv(index=False, float_format="%.6g") + f"# {CONVENTIONS}\n"
            else:
                text = render(t, fmt, title)
            p.write_text(text)
            written.append(p)
        if figures:
            written += _figures(t, out / "figures", stem, title)
    return written


def save_figure(fig, fig_dir: Path, name: str) -> list[Path]:
    """`<fig_dir>/<name>.png` and `.pdf`, deterministic (no software / creation-date metadata); closes `fig`."""
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        p = fig_dir / f"{name}.{ext}"
        fig.savefig(p, dpi=120, bbox_inches="tight", metadata=meta)
        paths.append(p)
    plt.close(fig)
    return paths


def accuracy_vs_flops_figure(frame, x: str, xlabel: str, title: str):
    """Accuracy against a FLOPs column, one line per method (sorted by the FLOPs); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, g in frame.groupby("method", sort=True):
        g = g.sort_values(x)
        ax.plot(g[x], g["accuracy"], marker="o", label=m)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _figures(t, fig_dir: Path, stem: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    has_flops = t["gflops"].notna().any()

    def save(fig, name):
        written.extend(save_figure(fig, fig_dir, f"{stem}_{name}"))

    if has_flops:
        save(accuracy_vs_flops_figure(t, "gflops", "prefill GFLOPs (counted)", f"Accuracy vs FLOPs — {title}"),
             "pareto")
        if "flops_ratio" in t and t["flops_ratio"].notna().any():
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for m, g in t[t["method"] != "none"].groupby("method", sort=True):
                g = g.sort_values("flops_ratio")
                ax.plot(g["flops_ratio"], g["retention"], marker="o", label=m)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xlabel("FLOPs ratio to none (budget)")
            ax.set_ylabel("retention (accuracy / none)")
            ax.set_title(f"Retention vs budget — {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            save(fig, "retention")
    if t["prefill_ms"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(t) + 1.5))
        labels = [f"{m} ({p})" if p != "-" else m for m, p in zip(t["method"], t["params"])]
        y = np.arange(len(t))
        ax.barh(y, t["prefill_ms"].fillna(0), label="prefill (TTFT)")
        ax.barh(y, (t["decode_ms"].fillna(0) * 8), left=t["prefill_ms"].fillna(0), label="8 decode steps")
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel("ms (median on the probe set)")
        ax.set_title(f"Latency breakdown — {title}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "latency")
    return written


def main(argv: list[str] | None = None) -> int:
    from harness.console import run_script

    return run_script("vtbench-report", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    from harness.console import ArgumentParser, choices_list

    ap = ArgumentParser(prog="vtbench-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=os.environ.get("VTBENCH_STORE", "runs/store"))
    ap.add_argument("--out", default="results")
    ap.add_argument("--formats", default="md,csv,tex", type=choices_list(("md", "csv", "tex")))
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    tables, corrupt = build_tables(args.store)
    for path, err in corrupt:
        print(f"vtbench-report: warning: skipped corrupt record {path} ({err})", file=sys.stderr)
    if not tables:
        print(f"vtbench-report: no complete records in {args.store}", file=sys.stderr)
        return 1
    written = write_outputs(tables, args.out, tuple(args.formats), figures=not args.no_figures)
    for (model, bench, limit, seed), t in tables.items():
        print(render(t, "md", f"{bench} on {model}"))
    print(f"[vtbench-report] wrote {len(written)} files under {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
