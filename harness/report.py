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
import functools
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

CONVENTIONS = (
    "FLOPs = 2 x multiply-accumulates of matrix products (linear layers, attention QK^T and AV, "
    "convolutions), counted with fvcore on the patched model (attention added back; element-wise ops not "
    "counted); prefill = vision encoder + projector + LLM over the prompt + LM head on the last position, "
    "on the first `run.efficiency.flops_docs` probe samples (default 1; mean when more, each record says "
    "how many). Latency: median [interquartile range] over every repeat of every probe "
    "sample (time to first token; decode per token). Memory: peak increase during the timed runs "
    "(GPU allocator on GPU, process RSS on CPU), shown only where it resolves the runs. Retention = "
    "accuracy / accuracy of `none` in the same comparison group. "
    "Agreement = share of samples whose prediction equals `none`'s; CI = paired bootstrap 95 % interval "
    "of the accuracy difference (2000 resamples, seed 0)."
)
#: printed under a table that pooled the seeds of a method (`pool_seeds`)
SEED_NOTE = (
    "Rows with several seeds pool the cells that differ only in the method's seed: accuracy, recall, "
    "agreement and efficiency are means over the seeds; \"over seeds\" gives their number, min–max and sd "
    "of the accuracy; the Δacc interval (and the figures' error bars) is mean ± 1.96·sqrt(Var_d(x̄_d)/n + "
    "s²_seeds/S), x̄_d a document's score averaged over the S seeds, s²_seeds the variance of the per-seed "
    "accuracies: the documents' sampling variation plus the seeds' variation."
)

#: (column, header); `{flops}` is the table's FLOPs unit, chosen by the model's size
COLUMNS = [
    ("method", "method"),
    ("budget", "budget"),
    ("params", "params"),
    ("visual_tokens_llm", "visual tokens→LLM"),
    ("visual_tokens_layer", "visual tokens/layer"),
    ("accuracy", "accuracy"),
    ("seed_spread", "over seeds: n, min–max (sd)"),  # only where cells differing in a method's seed were pooled
    ("asked_recall", "asked-cell recall"),  # shapes only (harness/recall.py); absent from older records
    ("retention", "retention"),
    ("agreement", "agree w/ none"),
    ("diff_ci", "Δacc 95% CI"),
    ("flops", "prefill {flops}"),
    ("flops_ratio", "FLOPs ratio"),
    ("prefill_ms", "prefill ms [IQR]"),
    ("decode_ms", "decode ms/tok [IQR]"),
    ("peak_mem_mb", "peak mem MB"),
    ("kv_mb", "KV cache MB"),
    ("n", "n"),
    ("spread_flag", "Δ vs none within baseline spread"),  # only where the baseline's spread is measured (harness/paper_check.py)
]
#: numeric columns of the CSV (and of the W&B report table) beside the displayed ones
CSV_EXTRA = ["gflops", "prefill_q1", "prefill_q3", "prefill_min", "prefill_max", "decode_q1", "decode_q3",
             "acc_ci_low", "acc_ci_high", "budget_note", "key"]

# record fields (flattened by harness.results.record_row)
F_TOTAL = "efficiency.flops.prefill.total"
F_PREFILL = "efficiency.latency.prefill_ms."
F_DECODE = "efficiency.latency.decode_ms_per_token."
F_PEAK = "efficiency.memory.peak_delta_bytes"
F_MEM_KIND = "efficiency.memory.kind"
F_KV = "efficiency.kv_cache_bytes"
F_VIS = "efficiency.visual_tokens_to_llm"   # after the method's last reduction (the budget rule's count)
F_VIS_OLD = "efficiency.visual_tokens_llm"   # records made before that field: the first LLM layer's count
F_VIS_LAYER = "efficiency.visual_tokens_mean_per_layer"
#: peak-memory deltas below this (on every row) are below what the CPU RSS sampler resolves
MEMORY_RESOLUTION_BYTES = 1 << 20


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


def accuracy_ci(samples: list[dict], metric: str, *, iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of one cell's accuracy (the error bars of the figures)."""
    x = np.array([float(s.get(metric, 0.0)) for s in samples])
    if not len(x):
        return (np.nan, np.nan)
    boots = x[np.random.default_rng(seed).integers(0, len(x), size=(iters, len(x)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def flops_unit(values) -> tuple[float, str]:
    """(scale, name) that fits the magnitude of a table's FLOPs (a tiny model in MFLOPs/GFLOPs, 13B in
    TFLOPs)."""
    v = [float(x) for x in values if x is not None and x == x]
    top = max(v) if v else 0.0
    for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if top >= scale:
            return scale, name
    return 1.0, "FLOPs"


@functools.lru_cache(maxsize=1)
def _method_order() -> tuple[str, ...]:
    """Every name a figure can show, in a fixed order: `none`, the registered methods, then the named
    compositions of conf/method (`shortv+fastv`, ...)."""
    import yaml

    import methods
    from harness.config import CONF_DIR

    names = [n for n in sorted(methods.available()) if n not in ("none", "compose")]
    combos = []
    for p in sorted((CONF_DIR / "method").glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text()) or {}
        if cfg.get("name") == "compose":
            label = methods.label("compose", cfg.get("params") or {})
            if label != "compose" and label not in combos:
                combos.append(label)
    return ("none", *names, *combos)


#: distinct colours (tab10, then Dark2), one per name of `_method_order`
_PALETTE = [*[f"C{i}" for i in range(10)], "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
            "#a6761d", "#666666", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354",
            "#756bb1"]
#: markers cycle on another period than the colours, so two methods never share both (`none` is a star)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def method_marker(method: str) -> str:
    """The marker of a method in every line figure: `none` a star, the others by their place in
    `_method_order` (any other composition by its name)."""
    if method == "none":
        return "*"
    order = _method_order()
    i = order.index(method) if method in order else sum(map(ord, method))
    return _MARKERS[i % len(_MARKERS)]


def method_colour(method: str):
    """One colour per method (or named composition) in every figure, by its place in `_method_order`;
    any other composition gets a colour of the palette's remainder by its name."""
    order = _method_order()
    if method in order:
        return _PALETTE[order.index(method) % len(_PALETTE)]
    rest = _PALETTE[len(order):] or _PALETTE
    return rest[sum(map(ord, method)) % len(rest)]


def short_params(method: str, params: dict) -> str:
    """The parameters that differ from the method's defaults, calibration artefacts as a short id (their
    path stays in the record), nested parameters flattened: short enough for a table cell and a label."""
    import methods

    if "members" in params and isinstance(params.get("members"), list):  # a composition: each member's own
        return " + ".join(f"{m.get('name')}: {short_params(m.get('name'), m.get('params') or {})}"
                          for m in params["members"] if isinstance(m, dict))
    try:
        defaults = methods.get(method)().params()
        cal_fields = set(getattr(methods.get(method), "calibration_fields", ()))
    except Exception:
        defaults, cal_fields = {}, set()
    out = []

    def add(prefix, k, v, d):
        if isinstance(v, dict):
            for kk, vv in sorted(v.items()):
                add(f"{prefix}{k}.", kk, vv, (d or {}).get(kk) if isinstance(d, dict) else None)
            return
        if v == d:
            return
        out.append(f"{prefix}{k}={v}")

    cals = [f"{Path(params[k]).stem.rsplit('-', 1)[-1][:8]}" for k in sorted(cal_fields)
            if isinstance(params.get(k), str)]
    for k, v in sorted(params.items()):
        if k not in cal_fields:
            add("", k, v, defaults.get(k, object()))
    if cals:  # one short id per calibration artefact (the paths are in the record)
        out.append("cal=" + "/".join(cals))
    return ", ".join(out) or "-"


class Group(NamedTuple):
    """One like-for-like comparison: cells equal in everything but the method, its parameters and the
    budget (`harness.results.comparison_group`). `variant` names what sets it apart from other groups of
    the same model, benchmark, limit and seed (e.g. `split=val`), empty when nothing does."""
    model: str
    benchmark: str
    limit: str
    seed: str
    variant: str = ""

    @property
    def stem(self) -> str:
        """File-name stem, safe whatever the names hold (`org/model`, `../x`)."""
        stem = f"{self.model}_{self.benchmark}" + (f"_limit{self.limit}" if self.limit not in ("None", "nan") else "") \
            + (f"_seed{self.seed}" if self.seed != "0" else "")
        if self.variant:
            stem += "_" + self.variant.replace("=", "-").replace(", ", "_")
        return safe_name(stem)

    @property
    def title(self) -> str:
        title = f"{self.benchmark} on {self.model}" + (f" (first {self.limit} samples)" if self.limit not in ("None", "nan") else "")
        return title + (f" [{self.variant}]" if self.variant else "")


def safe_name(name: str, limit: int = 120) -> str:
    """A file name made of letters, digits, '.', '_' and '-' only, never hidden, never a path."""
    import hashlib
    import re

    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).lstrip(".-") or "x"
    if len(out) > limit:
        out = out[: limit - 9] + "-" + hashlib.sha256(str(name).encode()).hexdigest()[:8]
    return out


def _variants(groups: dict[str, dict]) -> dict[str, str]:
    """A short label per comparison group telling it apart from the groups it shares a base name with."""
    from harness.results import _flatten

    flat = {}
    for gid, ident in groups.items():
        f: dict = {}
        _flatten("", ident, f)
        flat[gid] = {k: json.dumps(v, sort_keys=True, default=str) for k, v in f.items()}
    base = {gid: (f.get("model.name"), f.get("benchmark.name"), f.get("limit"), f.get("seed")) for gid, f in flat.items()}
    out = {}
    for gid in groups:
        peers = [g for g in groups if base[g] == base[gid]]
        if len(peers) == 1:
            out[gid] = ""
            continue
        keys = sorted({k for g in peers for k in flat[g]})
        differ = [k for k in keys if len({flat[g].get(k) for g in peers}) > 1]
        label = ", ".join(f"{k.split('.')[-1] if k.count('.') else k}={json.loads(flat[gid][k]) if k in flat[gid] else '-'}"
                          for k in differ)
        out[gid] = label if len(label) <= 60 else f"group {gid[:8]}"
    return out


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
    """{Group: DataFrame} (one like-for-like comparison each) plus the list of invalid records skipped."""
    import warnings

    import pandas as pd

    from harness.results import StoreError, comparison_group, load

    if not str(store_dir).strip():  # `load("")` would read $VTBENCH_STORE, the records the current directory
        raise StoreError("store: empty path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load(store_dir)
    recs, corrupt = _records(store_dir)
    tables = {}
    if df.empty:
        return tables, corrupt
    variants = _variants({gid: comparison_group(recs[g["key"].iloc[0]]["cell"]) for gid, g in df.groupby("group")})
    for gid, g in df.groupby("group", sort=False):
        g = _one_per_setting(g)
        first = g.iloc[0]
        gkey = Group(*(num_label(first[c]) for c in ("model", "benchmark", "limit", "seed")), variants[gid])
        base = g[g["method"] == "none"]
        base_row = base.iloc[0] if len(base) else None
        base_rec = recs.get(base_row["key"]) if base_row is not None else None
        rows = [_row(r, recs[r["key"]], base_row, base_rec) for _, r in g.iterrows()]
        t = pool_seeds(pd.DataFrame(rows), recs, base_rec)
        _flag_same_settings(t)
        t["_order"] = [(m != "none", m, -_budget_value(b), p) for m, b, p in zip(t["method"], t["budget"], t["params"])]
        t = t.sort_values("_order").drop(columns="_order").reset_index(drop=True)
        t.attrs["flops_unit"] = flops_unit(t["gflops"] * 1e9)
        t.attrs["show_memory"] = bool((t["_mem_cuda"].any()) or (t["peak_mem_mb"].fillna(0) * 2**20 >= MEMORY_RESOLUTION_BYTES).any())
        tables[gkey] = t.drop(columns="_mem_cuda")
    return dict(sorted(tables.items())), corrupt


def _num(v):
    return float(v) if v is not None and v == v else np.nan  # noqa: PLR0124 (NaN check)


def _row(r, rec: dict, base_row, base_rec) -> dict:
    params = json.loads(r["method_params"]) if r["method_params"] else {}
    metric = rec.get("primary_metric") or "exact_match"
    lo, hi = accuracy_ci(rec.get("samples", []), metric)
    budget, note = _budget_label(r.get("budget")), budget_note(rec.get("budget"))
    # the runtime guard (harness/efficiency/probe.py): what the patched model did that the method's own
    # formulas do not say; absent from records made before it
    mismatches = (rec.get("efficiency") or {}).get("mismatches") or []
    row = {
        "method": r["method"],
        "budget": budget + ("†" if note else ""),
        "budget_note": note or "",
        "mismatch": "; ".join(mismatches),
        "params": short_params(r["method"], params) + (" ‡" if mismatches else ""),
        "accuracy": r["accuracy"],
        "acc_ci_low": lo,
        "acc_ci_high": hi,
        "n": r["n_samples"],
        "visual_tokens_llm": r.get(F_VIS) if r.get(F_VIS) == r.get(F_VIS) and r.get(F_VIS) is not None else r.get(F_VIS_OLD),
        "visual_tokens_layer": r.get(F_VIS_LAYER),
        "gflops": _num(r.get(F_TOTAL)) / 1e9,
        "prefill_ms": _num(r.get(F_PREFILL + "median")),
        "prefill_q1": _num(r.get(F_PREFILL + "q1")),
        "prefill_q3": _num(r.get(F_PREFILL + "q3")),
        "prefill_min": _num(r.get(F_PREFILL + "min")),
        "prefill_max": _num(r.get(F_PREFILL + "max")),
        "decode_ms": _num(r.get(F_DECODE + "median")),
        "decode_q1": _num(r.get(F_DECODE + "q1")),
        "decode_q3": _num(r.get(F_DECODE + "q3")),
        "peak_mem_mb": _num(r.get(F_PEAK)) / 2**20,
        "_mem_cuda": r.get(F_MEM_KIND) == "cuda_allocated",
        "kv_mb": _num(r.get(F_KV)) / 2**20,
        "key": r["key"],
    }
    recall = r.get("asked_recall")
    if recall is not None and recall == recall:  # noqa: PLR0124 (NaN check)
        row["asked_recall"] = recall
    if base_row is not None:
        row["retention"] = r["accuracy"] / base_row["accuracy"] if base_row["accuracy"] else np.nan
        bt = base_row.get(F_TOTAL)
        row["flops_ratio"] = (r.get(F_TOTAL) / bt) if bt and r.get(F_TOTAL) is not None else np.nan
        ps = paired_stats(rec.get("samples", []), base_rec.get("samples", []), metric)
        row["agreement"] = ps["agreement"]
        row["diff_ci"] = f"{ps['diff']:+.3f} [{ps['ci_low']:+.3f}, {ps['ci_high']:+.3f}]" if ps["diff"] is not None else "-"
    return row


# ---- cells that differ only in a method's seed: one row (mean, spread, interval with seed variance) -------
#: method parameters that are seeds (at any depth: a composition's members carry their own)
SEED_PARAMS = ("seed",)


def split_seed(params):
    """(params without their seed entries, the seed values in a canonical tuple) of one cell's parameters."""
    seeds = []

    def strip(x, path=""):
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k in SEED_PARAMS and not isinstance(v, (dict, list)):
                    seeds.append((f"{path}{k}", v))
                else:
                    out[k] = strip(v, f"{path}{k}.")
            return out
        if isinstance(x, list):
            return [strip(v, f"{path}{i}.") for i, v in enumerate(x)]
        return x

    rest = strip(params or {})
    return rest, tuple(sorted(seeds, key=lambda kv: kv[0]))


def seed_pooled_interval(scores, base=None, z: float = 1.96) -> dict:
    """Mean and 95 % interval over S seeds x n documents (`scores` [S, n], the same documents in every row;
    `base` [n]: the `none` scores of those documents, for the difference).

    The estimate is the mean x̄ of all S*n scores (equal n: the mean of the per-seed accuracies a_s). Its
    variance combines the documents' sampling variation and the seeds' variation:
        Var(x̄) = Var_d(x̄_d) / n + s²_seeds / S,
    with x̄_d the document's score averaged over the seeds (so a document's correlation across seeds is
    kept) and s²_seeds the sample variance of the per-seed accuracies (ddof 1). In the model
    x_sd = mu + alpha_s + beta_d + gamma_sd this is sigma²_alpha/S + sigma²_beta/n + 2 sigma²_gamma/(S n):
    the interaction term is counted twice, which keeps the interval slightly conservative. Interval:
    x̄ ± z·sqrt(Var). With `base`, the same for the per-document difference x_sd - base_d."""
    x = np.asarray(scores, dtype=float)
    if base is not None:
        x = x - np.asarray(base, dtype=float)[None, :]
    S, n = x.shape
    per_seed = x.mean(axis=1)
    mean = float(per_seed.mean())
    var_docs = float(x.mean(axis=0).var(ddof=1)) / n if n > 1 else 0.0
    var_seeds = float(per_seed.var(ddof=1)) / S if S > 1 else 0.0
    half = z * float(np.sqrt(var_docs + var_seeds))
    return {"mean": mean, "low": mean - half, "high": mean + half, "var_docs": var_docs, "var_seeds": var_seeds,
            "per_seed": [float(v) for v in per_seed], "sd_seeds": float(per_seed.std(ddof=1)) if S > 1 else 0.0}


def _scores_by_doc(rec: dict) -> dict:
    metric = rec.get("primary_metric") or "exact_match"
    return {s["doc_id"]: float(s.get(metric, 0.0)) for s in rec.get("samples", [])}


def pool_seeds(t, recs: dict, base_rec: dict | None):
    """Rows of one comparison table that differ only in a method's seed (same method, budget, other
    parameters) become one row: accuracy and asked-cell recall as the mean over the seeds, `seed_spread`
    "S: min–max (sd)", the accuracy interval (`acc_ci_low/high`) and the Δ vs `none` interval from
    `seed_pooled_interval` on the documents every seed (and `none`) answered, agreement and efficiency
    columns as means over the seeds, `params` without the seed and with "seeds=..." appended, `key` the
    seeds' keys joined by "+". Rows of a single seed stay as they are."""
    import pandas as pd

    if t.empty:
        return t
    groups: dict = {}
    for i, r in t.iterrows():
        rec = recs[r["key"]]
        params = rec.get("method_params") or rec.get("cell", {}).get("method", {}).get("params", {}) or {}
        rest, seeds = split_seed(params)
        groups.setdefault((r["method"], r["budget"], json.dumps(rest, sort_keys=True, default=str)), []).append((i, seeds, rest))
    out, done = [], set()
    for i, r in t.iterrows():
        if i in done:
            continue
        members = next(m for m in groups.values() if any(j == i for j, _, _ in m))
        if len(members) < 2 or len({s for _, s, _ in members}) < len(members) or not members[0][1]:
            out.append(r.to_dict())
            done.add(i)
            continue
        members = sorted(members, key=lambda m: [v for _, v in m[1]])
        done.update(j for j, _, _ in members)
        out.append(_pooled_row(t, [j for j, _, _ in members], [s for _, s, _ in members], members[0][2], recs, base_rec))
    return pd.DataFrame(out)


def _pooled_row(t, idx: list, seeds: list, rest: dict, recs: dict, base_rec: dict | None) -> dict:
    rows = t.loc[idx]
    row = rows.iloc[0].to_dict()
    by_doc = [_scores_by_doc(recs[k]) for k in rows["key"]]
    docs = set(by_doc[0]).intersection(*by_doc[1:])
    base = _scores_by_doc(base_rec) if base_rec is not None else None
    if base is not None:
        docs &= set(base)
    docs = sorted(docs)
    scores = np.array([[d[x] for x in docs] for d in by_doc]) if docs else np.zeros((len(idx), 0))
    acc = [float(a) for a in rows["accuracy"]]
    row["accuracy"] = float(np.mean(acc))
    row["seed_spread"] = f"{len(acc)}: {min(acc):.3f}–{max(acc):.3f} (sd {np.std(acc, ddof=1):.3f})"
    if docs:
        ci = seed_pooled_interval(scores)
        row["acc_ci_low"], row["acc_ci_high"] = ci["low"], ci["high"]
    else:
        row["acc_ci_low"] = row["acc_ci_high"] = np.nan
    row["n"] = rows["n"].iloc[0] if rows["n"].nunique() == 1 else f"{rows['n'].min()}–{rows['n'].max()}"
    for c in ("asked_recall", "agreement", "visual_tokens_llm", "visual_tokens_layer", "gflops", "flops_ratio",
              "prefill_ms", "prefill_q1", "prefill_q3", "prefill_min", "prefill_max", "decode_ms", "decode_q1",
              "decode_q3", "peak_mem_mb", "kv_mb"):
        if c in rows.columns:
            v = pd_numeric(rows[c])
            row[c] = float(v.mean()) if v.notna().any() else np.nan
    if "retention" in rows.columns:
        row["retention"] = float(pd_numeric(rows["retention"]).mean())
    if base is not None and docs:
        d = seed_pooled_interval(scores, [base[x] for x in docs])
        row["diff_ci"] = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    names = sorted({k for s in seeds for k, _ in s})
    label = "; ".join(f"{k}=" + ",".join(num_label(dict(s).get(k)) for s in seeds) for k in names)
    plain = short_params(row["method"], rest)
    row["params"] = label if plain == "-" else f"{plain}, {label}"
    row["key"] = "+".join(rows["key"])
    return row


def pd_numeric(col):
    import pandas as pd

    return pd.to_numeric(col, errors="coerce")


def budget_note(info: dict | None) -> str | None:
    """Why a budget was not met (`harness.budget_note`, the rule the run warns with)."""
    from harness.budget_note import budget_note as note

    return note(info)


def _flag_same_settings(t) -> None:
    """Budgets of one method that resolved to the same parameters are one setting: say so."""
    for (_m, _p), g in t[t["budget"] != "-"].groupby(["method", "params"]):
        if len(g) > 1:
            for i in g.index:
                note = t.at[i, "budget_note"]
                others = ", ".join(b.rstrip("†") for j, b in g["budget"].items() if j != i)
                extra = f"same setting as {others}"
                t.at[i, "budget_note"] = f"{note}; {extra}" if note else extra
                if not t.at[i, "budget"].endswith("†"):
                    t.at[i, "budget"] += "†"


def _one_per_setting(g):
    """One row per (method, params, budget) of a group: a record with efficiency figures wins over one
    without (they share everything but that), then the newest."""
    g = g.assign(_eff=g[F_TOTAL].notna() if F_TOTAL in g else False)
    g = g.sort_values(["_eff", "created"], ascending=False, kind="stable")
    g = g.drop_duplicates(subset=["method", "method_params", "budget"], keep="first")
    return g.drop(columns="_eff").sort_values("key", kind="stable")


def _budget_label(raw) -> str:
    if not raw or raw != raw:
        return "-"
    b = json.loads(raw) if isinstance(raw, str) else raw
    if not b:
        return "-"
    unit = "tokens" if b["kind"] == "tokens" else "FLOPs"
    v = b["value"]
    return f"{num_label(v)} {unit}" if v > 1 else f"{num_label(100 * v)}% {unit}"


def num_label(v, digits: int = 4) -> str:
    """A number as a label or file-name part: integers as integers (`8`, never `8.0` from a pandas float
    column), others with `digits` significant digits and no exponent (`1e-07` -> `0.0000001`); NaN and
    None as `None`, anything else as `str`."""
    if v is None or isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if v != v:
            return "None"
        if np.isinf(v):
            return str(float(v))
        if float(v).is_integer() and abs(v) < 1e15:
            return str(int(v))
        return np.format_float_positional(float(v), precision=digits, unique=True, fractional=False, trim="-")
    return str(v)


def _budget_value(label: str) -> float:
    try:
        num = label.split()[0]
        return float(num[:-1]) / 100 if num.endswith("%") else float(num)
    except (ValueError, IndexError, AttributeError):
        return 2.0  # no budget: the method's own parameters first


def _fmt(v, col, t=None):
    if col == "flops":
        scale, _ = (t.attrs.get("flops_unit") if t is not None else None) or (1e9, "GFLOPs")
        v = v * 1e9 / scale if v is not None and v == v else v
        return "-" if v is None or v != v else f"{v:.4g}"
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if col in ("accuracy", "retention", "agreement", "flops_ratio", "asked_recall"):
        return f"{v:.3f}"
    if col in ("peak_mem_mb", "kv_mb", "visual_tokens_layer"):
        return f"{v:.1f}"
    if col in ("visual_tokens_llm", "n"):
        return f"{v:.0f}" if isinstance(v, (int, float)) else str(v)
    return str(v)


def _latency_cell(r, stem: str) -> str:
    med, q1, q3 = r[f"{stem}_ms"], r.get(f"{stem}_q1"), r.get(f"{stem}_q3")
    if med is None or med != med:
        return "-"
    return f"{med:.1f} [{q1:.1f}–{q3:.1f}]" if q1 == q1 and q3 == q3 and q1 is not None else f"{med:.1f}"


def display_frame(t):
    """The table as shown: formatted strings, headers with units, columns that resolve nothing dropped."""
    import pandas as pd

    shown = [(c, h) for c, h in COLUMNS if (c in t.columns or c == "flops")
             and (c != "peak_mem_mb" or t.attrs.get("show_memory", True))]
    unit = (t.attrs.get("flops_unit") or (1e9, "GFLOPs"))[1]
    data = {}
    for c, h in shown:
        if c == "flops":
            data[h.format(flops=unit)] = [_fmt(v, "flops", t) for v in t["gflops"]]
        elif c in ("prefill_ms", "decode_ms"):
            data[h] = [_latency_cell(r, c[:-3]) for _, r in t.iterrows()]
        else:
            data[h] = [_fmt(v, c) for v in t[c]]
    return pd.DataFrame(data)


def _notes(t) -> list[str]:
    notes = []
    if "seed_spread" in t.columns:
        notes.append(SEED_NOTE)
    if "retention" not in t.columns:
        notes.append("This group has no `none` cell: retention, FLOPs ratio and the comparison with `none` are not "
                     "computed (never taken from another group).")
    flagged = t[t["budget_note"] != ""]
    for m, g in flagged.groupby("method", sort=True):  # one line per method
        notes.append(f"† {m}: " + "; ".join(f"{r['budget'].rstrip('†')}: {r['budget_note']}" for _, r in g.iterrows()) + ".")
    if "mismatch" in t.columns:
        for _, r in t[t["mismatch"] != ""].iterrows():  # the runtime guard: never silent
            notes.append(f"‡ {r['method']} ({r['params'].rstrip(' ‡')}): {r['mismatch']} — its FLOPs or token "
                         "count are not what the method reports.")
    if not t.attrs.get("show_memory", True):
        notes.append("Peak memory is not shown: the process RSS sampled on CPU does not resolve these runs' "
                     "allocations (every row measured under 1 MiB).")
    notes += t.attrs.get("extra_notes", [])  # baseline spread, blind control (harness/paper_check.py)
    return notes


def render(t, fmt: str, title: str) -> str:
    d = display_frame(t)
    notes = _notes(t)
    if fmt == "md":
        out = [f"### {title}", "", d.to_markdown(index=False, disable_numparse=True)]
        out += [""] + [f"*{n}*" for n in notes]
        out += ["", f"*Counting conventions:* {CONVENTIONS}", ""]
        return "\n".join(out)
    if fmt == "tex":
        return _latex(d, title, notes)
    raise ValueError(fmt)


#: LaTeX's special characters in text; `~`, `^` and `\\` become words, which swallow a following space
_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde ", "^": r"\textasciicircum ", "\\": r"\textbackslash "}


def latex_escape(text: str) -> str:
    """`text` safe in LaTeX's text mode (the escaping of pandas' `Styler.format(escape="latex")`): the ten
    special characters replaced, and `\\space` kept after a word-like replacement that a space follows."""
    out = []
    for i, ch in enumerate(text):
        rep = _LATEX_SPECIAL.get(ch, ch)
        if ch in "~^\\" and text[i + 1 : i + 2] == " ":
            rep += r"\space"
        out.append(rep)
    return "".join(out)


def _latex(d, title: str, notes: list[str]) -> str:
    """LaTeX through pandas' Styler (booktabs rules, escaped cells and headers)."""
    tex = {"→": r"$\to$", "Δ": r"$\Delta$", "–": "--", "†": r"$^\dagger$"}

    def esc(s: str) -> str:
        s = latex_escape(str(s))
        for a, b in tex.items():
            s = s.replace(a, b)
        return s

    d = d.copy()
    d.columns = [esc(c) for c in d.columns]
    d = d.map(esc)
    caption = esc(f"{title}. " + " ".join(notes + [CONVENTIONS]))
    body = d.style.hide(axis="index").to_latex(
        column_format="l" * 3 + "r" * (len(d.columns) - 3), hrules=True, position="t", position_float="centering",
        caption=caption, environment="table")
    return body.replace("\\begin{tabular}", "\\small\n\\begin{tabular}", 1)


def write_outputs(tables: dict, out_dir: str, formats=("md", "csv", "tex"), figures: bool = True) -> list[Path]:
    """Every table (and figure) of `tables` under `out_dir`, all or nothing: each file is written to a temporary
    file first, and the previous files are replaced only once all are written (`harness.paths`), so a full
    disk or an error half-way leaves the previous report byte-identical. An OSError names the path."""
    from harness.paths import all_or_nothing

    with all_or_nothing():
        return _write_outputs(tables, out_dir, formats, figures)


def _write_outputs(tables: dict, out_dir: str, formats, figures: bool) -> list[Path]:
    from harness.paths import atomic_write

    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = []
    for group, t in tables.items():
        stem, title = group.stem, group.title
        for fmt in formats:
            p = out / "tables" / f"{stem}.{fmt}"
            if fmt == "csv":
                cols = [c for c, _ in COLUMNS if c in t.columns] + [c for c in CSV_EXTRA if c in t.columns]
                text = t[cols].to_csv(index=False, float_format="%.6g") + f"# {CONVENTIONS}\n"
            else:
                text = render(t, fmt, title)
            atomic_write(p, text)
            written.append(p)
        if figures:
            written += _figures(t, out / "figures", stem, title)
    return written


def save_figure(fig, fig_dir: Path, name: str) -> list[Path]:
    """`<fig_dir>/<name>.png` and `.pdf`, deterministic (no software / creation-date metadata); closes `fig`."""
    import matplotlib.pyplot as plt

    from harness.paths import atomic_target

    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
            p = fig_dir / f"{name}.{ext}"
            with atomic_target(p) as tmp:  # atomic, like every file vtbench writes
                fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight", metadata=meta)
            paths.append(p)
    finally:
        plt.close(fig)
    return paths


def accuracy_vs_flops_figure(frame, x: str, title: str, *, what: str = "prefill", ci: bool = True):
    """Accuracy against raw FLOPs (column `x`, in FLOPs; the axis unit fits their size), one line per
    method through its budgets in the method's own colour, with the accuracy's 95 % CI as error bars
    where the frame has them (`acc_ci_low`/`acc_ci_high`); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = flops_unit(frame[x])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, g in frame.groupby("method", sort=True):
        g = g.sort_values(x)
        xs, ys = g[x] / scale, g["accuracy"]
        kw = dict(color=method_colour(m), label=m, marker=method_marker(m), ms=11 if m == "none" else 5)
        if ci and {"acc_ci_low", "acc_ci_high"} <= set(g.columns) and g["acc_ci_low"].notna().any():
            err = np.vstack([ys - g["acc_ci_low"], g["acc_ci_high"] - ys]).clip(min=0)
            ax.errorbar(xs, ys, yerr=err, capsize=2, lw=1.2, elinewidth=0.8, **kw)
        else:
            ax.plot(xs, ys, lw=1.2, **kw)
    ax.set_xlabel(f"{what} {unit} (counted)")
    ax.set_ylabel("accuracy" + (" (95 % CI)" if ci else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def recall_vs_flops_figure(t, title: str):
    """Asked-cell recall (mean over samples and LLM layers, harness/recall.py) against prefill FLOPs, one
    line per method through its budgets; methods whose recall is not measured are left out."""
    import matplotlib.pyplot as plt

    t = t[t["asked_recall"].notna()].assign(flops_raw=lambda d: d["gflops"] * 1e9)
    scale, unit = flops_unit(t["flops_raw"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, g in t.groupby("method", sort=True):
        g = g.sort_values("flops_raw")
        ax.plot(g["flops_raw"] / scale, g["asked_recall"], lw=1.2, color=method_colour(m), label=m,
                marker=method_marker(m), ms=11 if m == "none" else 5)
    ax.set_xlabel(f"prefill {unit} (counted)")
    ax.set_ylabel("asked-cell recall (mean over samples and LLM layers)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _figures(t, fig_dir: Path, stem: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.extend(save_figure(fig, fig_dir, f"{stem}_{name}"))

    if t["gflops"].notna().any():
        save(accuracy_vs_flops_figure(t.assign(flops_raw=t["gflops"] * 1e9), "flops_raw", f"Accuracy vs FLOPs — {title}"),
             "pareto")
        if "flops_ratio" in t and t["flops_ratio"].notna().any():
            fig, ax = plt.subplots(figsize=(6, 4.2))
            for m, g in t[t["method"] != "none"].groupby("method", sort=True):
                g = g.sort_values("flops_ratio")
                ax.plot(g["flops_ratio"], g["retention"], marker=method_marker(m), ms=5, lw=1.2, label=m, color=method_colour(m))
            ax.axhline(1.0, color=method_colour("none"), lw=0.8, ls="--", label="none")
            ax.set_xlabel("prefill FLOPs ratio to none (counted)")
            ax.set_ylabel("retention (accuracy / none)")
            ax.set_title(f"Retention vs FLOPs — {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
            save(fig, "retention")
    if "asked_recall" in t and t["asked_recall"].notna().any() and t["gflops"].notna().any():
        save(recall_vs_flops_figure(t, f"Asked-cell recall vs FLOPs — {title}"), "recall")
    if t["prefill_ms"].notna().any():
        save(_latency_figure(t, title), "latency")
    return written


def _latency_figure(t, title: str):
    """Prefill (time to first token) and 8 decode steps per cell, labelled by method and budget, with the
    prefill's interquartile range; one colour per method."""
    import matplotlib.pyplot as plt

    t = t.iloc[::-1].reset_index(drop=True)  # the table's first row on top
    labels = [m if b == "-" else f"{m} · {b}" for m, b in zip(t["method"], t["budget"])]
    y = np.arange(len(t))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(t) + 1.4))
    colours = [method_colour(m) for m in t["method"]]
    pre = t["prefill_ms"].fillna(0)
    dec = t["decode_ms"].fillna(0) * 8
    ax.barh(y, pre, color=colours, edgecolor="black", lw=0.4, label="prefill (TTFT)")
    ax.barh(y, dec, left=pre, color=colours, alpha=0.35, edgecolor="black", lw=0.4, label="8 decode steps")
    if t["prefill_q1"].notna().any():
        err = np.vstack([pre - t["prefill_q1"].fillna(pre), t["prefill_q3"].fillna(pre) - pre]).clip(min=0)
        ax.errorbar(pre, y, xerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2, label="prefill IQR")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.6, len(t) - 0.4)
    ax.set_xlabel("ms (median over the probe set's repeats)")
    ax.set_title(f"Latency — {title}", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="0.35", edgecolor="black", lw=0.4, label="prefill (TTFT), the method's colour"),
               Patch(facecolor="0.35", alpha=0.35, edgecolor="black", lw=0.4, label="8 decode steps")]
    handles += [h for h in ax.get_legend_handles_labels()[0] if getattr(h, "get_label", lambda: "")() == "prefill IQR"]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig
