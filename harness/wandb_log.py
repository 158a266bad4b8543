"""Weights & Biases logging: one run per cell (config, summary metrics, per-sample table).

Offline by default. `mode=online` without credentials falls back to offline with a warning instead of
failing the cell; a W&B failure never loses the record (the local store is the source of truth).
"""
from __future__ import annotations

import os
import sys
import warnings


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    try:
        return "api.wandb.ai" in open(netrc).read()
    except OSError:
        return False


def effective_mode(mode: str) -> str:
    env = os.environ.get("WANDB_MODE")
    mode = env or mode or "offline"
    if mode == "online" and not _has_credentials():
        warnings.warn("vtbench: W&B online mode requested without credentials; logging offline instead")
        mode = "offline"
    return mode


def _flat(prefix, obj, out, numeric_only=False):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out, numeric_only)
    elif isinstance(obj, bool) or not isinstance(obj, (int, float)):
        if not numeric_only and (isinstance(obj, (str, bool)) or obj is None):
            out[prefix] = obj
    else:
        out[prefix] = obj


def budget_label(budget: dict | None) -> str:
    """`tok33%`, `tok48`, `flops50%` or `` (no budget): short enough for run names and table cells."""
    if not budget or budget.get("kind") is None:
        return ""
    v = float(budget["value"])
    kind = "tok" if budget["kind"] == "tokens" else "flops"
    return f"{kind}{100 * v:g}%" if v <= 1 else f"{kind}{v:g}"


def run_name(record: dict) -> str:
    cell = record["cell"]
    import methods

    parts = [cell["model"]["name"], methods.label(cell["method"]["name"], cell["method"].get("params")),
             budget_label(cell.get("budget")),
             cell["benchmark"]["name"], record["key"][:8]]
    return "-".join(p.replace("/", "-") for p in parts if p)


def _samples_table(wandb, record: dict, doc_inputs, max_images: int):
    """Per-sample table with typed columns: doc_id (int), question, image (a small wandb.Image, first
    `max_images` samples), target, prediction, each metric (float), non-finite/failed flags (bool)."""
    samples = record.get("samples") or []
    metrics = sorted({k for s in samples for k, v in s.items() if k not in ("doc_id", "target", "prediction")
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
    task = (record.get("data") or {}).get("task") or ""
    nonfinite = set(record.get("nonfinite") or [])
    failed = set(record.get("failures") or {})
    cols = ["doc_id", "question", "image", "target", "prediction", *metrics, "nonfinite", "failed"]
    from wandb.sdk.data_types import _dtypes

    opt = _dtypes.OptionalType  # a question/image/metric may be missing (None); nothing else mixes types
    dtype = [int, opt(str), opt(wandb.Image), str, str, *[opt(float)] * len(metrics), bool, bool]
    table = wandb.Table(columns=cols, dtype=dtype)
    for i, s in enumerate(samples):
        question, image = doc_inputs(s["doc_id"]) if doc_inputs else (None, None)
        if image is not None and i < max_images:
            thumb = image.convert("RGB").copy()
            thumb.thumbnail((96, 96))
            image = wandb.Image(thumb)
        else:
            image = None
        tag = f"{task}/{s['doc_id']}"
        table.add_data(int(s["doc_id"]), question, image, str(s.get("target")), str(s.get("prediction")),
                       *[float(s[m]) if s.get(m) is not None else None for m in metrics], tag in nonfinite, tag in failed)
    return table


#: the folder, under the run's `files/`, that holds the per-sample table and its images (`samples.table.json`,
#: `media/images/*.png`): W&B itself keeps a table with media only in an artifact staged outside the run folder
#: (`~/.local/share/wandb/artifacts/staging`), so a copied run folder would lose it
SAMPLES_DIR = "samples"


def store_table_in_run(wandb, run, table, folder: str) -> str:
    """Write `table` (with its images) in W&B's artifact layout under `<run.dir>/<folder>/`: the table as
    `<folder>.table.json` (typed columns, rows) and each image at the `media/images/...` path the table names;
    returns the table's path relative to `run.dir`. Written through a local `wandb.Artifact` (never logged), whose
    staged copies are removed once copied."""
    import shutil

    import re

    art = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{folder}-{run.id}"), type="vtbench-table")
    art.add(table, folder)
    root = os.path.join(run.dir, folder)
    for path, entry in art.manifest.entries.items():
        dst = os.path.join(root, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(entry.local_path, dst)
        if os.sep + "staging" + os.sep in str(entry.local_path):
            try:
                os.remove(entry.local_path)
            except OSError:
                pass
    return f"{folder}/{folder}.table.json"


def run_folder(run_dir: str) -> str:
    """The run's folder (`.../wandb/offline-run-<time>-<id>`) from `run.dir` (its `files/`)."""
    return os.path.dirname(os.path.normpath(run_dir))


def drop_superseded_offline_runs(folder: str, run_id: str) -> list[str]:
    """Remove the other offline folders of run `run_id` beside `folder` (a forced re-run of a cell logs the
    whole cell again under the same id; W&B starts a new `offline-run-<time>-<id>` folder each time), so each
    cell has one run folder. Folders already synced (`*.wandb.synced` beside the log) are kept. Returns the
    removed folders."""
    import glob
    import shutil

    removed = []
    parent = os.path.dirname(folder)
    for other in glob.glob(os.path.join(glob.escape(parent), f"offline-run-*-{glob.escape(run_id)}")):
        if os.path.realpath(other) == os.path.realpath(folder):
            continue
        if glob.glob(os.path.join(glob.escape(other), "*.wandb.synced")):
            continue
        shutil.rmtree(other, ignore_errors=True)
        removed.append(other)
    return removed


def log_cell(record: dict, logger_cfg: dict, config: dict, doc_inputs=None) -> dict | None:
    """Log one cell; returns {"run_id", "dir", "mode"} or None if disabled/failed.

    One W&B run per cell identity: its id is the record key, so forcing or resuming a cell continues that
    run (`resume="allow"`) instead of creating a duplicate; its name carries model, method, budget,
    benchmark and the key. The config is the resolved config plus `resolved` (the method's parameters
    after budget and calibration, the budget's solution, the key); the summary holds numbers only (and the
    key); the per-sample table is typed. `doc_inputs(doc_id) -> (question, PIL image | None)` fills the
    question and image columns."""
    if not logger_cfg or logger_cfg.get("name") != "wandb":
        return None
    mode = effective_mode(logger_cfg.get("mode", "offline"))
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        cell = record["cell"]
        wdir = os.path.expanduser(str(logger_cfg.get("dir") or "runs"))
        os.makedirs(wdir, exist_ok=True)
        group = logger_cfg.get("group") or f"{cell['model']['name']}-{cell['benchmark']['name']}"
        resolved = {"key": record["key"], "method": record.get("method_description"),
                    "method_params": record.get("method_params"), "budget": record.get("budget"),
                    "budget_label": budget_label(cell.get("budget")) or None,
                    "calibration": {k: (v or {}).get("key") for k, v in (record.get("calibration") or {}).items()}}
        run = wandb.init(
            project=logger_cfg.get("project", "vtbench"),
            entity=logger_cfg.get("entity"),
            id=record["key"],
            resume="allow",
            name=run_name(record),
            group=group,
            job_type="cell",
            # the packages that matter are in `environment` (the record's): W&B's own scan of every installed
            # package (requirements.txt) would cost each cell a quarter of a second
            config={**config, "resolved": resolved, "environment": record.get("environment")},
            dir=wdir,
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(x_save_requirements=False),
        )
        summary = {}
        _flat("", {"metrics": record.get("metrics", {}), "efficiency": record.get("efficiency", {})}, summary,
              numeric_only=True)
        for k in ("accuracy", "n_samples", "n_failed", "n_empty", "n_nonfinite", "n_resumed"):
            if isinstance(record.get(k), (int, float)):
                summary[k] = record[k]
        if isinstance(record.get("asked_recall"), dict):  # shapes: asked-cell recall (harness/recall.py)
            summary["asked_recall"] = record["asked_recall"]["mean"]
            for i, v in enumerate(record["asked_recall"].get("per_layer") or []):
                if v is not None:  # None: a layer before the method acts (not counted)
                    summary[f"asked_recall/layer_{i:02d}"] = v
        summary["key"] = record["key"]
        run.summary.update(summary)
        info = {"run_id": run.id, "dir": run.dir, "mode": mode}
        if logger_cfg.get("log_samples", True) and record.get("samples"):
            def table():  # one Table object per use: W&B binds a logged table to where it was logged
                return _samples_table(wandb, record, doc_inputs, int(logger_cfg.get("max_images", 64)))

            # in the run folder (a copied folder keeps it), and logged for the W&B UI (its run-table artifact)
            info["samples_table"] = store_table_in_run(wandb, run, table(), SAMPLES_DIR)
            run.log({"samples": table()})
        run.finish()
        if mode == "offline":
            drop_superseded_offline_runs(run_folder(run.dir), run.id)
        return info
    except Exception as e:  # never lose a cell because of the logger
        print(f"vtbench: warning: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
