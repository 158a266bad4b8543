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


def _flat(prefix, obj, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj


def log_cell(record: dict, logger_cfg: dict, config: dict) -> dict | None:
    """Log one cell; returns {"run_id", "dir", "mode"} or None if disabled/failed."""
    if not logger_cfg or logger_cfg.get("name") != "wandb":
        return None
    mode = effective_mode(logger_cfg.get("mode", "offline"))
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        cell = record["cell"]
        name = f"{cell['model']['name']}-{cell['method']['name']}-{cell['benchmark']['name']}-{record['key'][:8]}"
        wdir = os.path.expanduser(str(logger_cfg.get("dir") or "runs"))
        os.makedirs(wdir, exist_ok=True)
        group = logger_cfg.get("group") or f"{cell['model']['name']}-{cell['benchmark']['name']}"
        run = wandb.init(
            project=logger_cfg.get("project", "vtbench"),
            entity=logger_cfg.get("entity"),
            name=name,
            group=group,
            job_type="cell",
            config=config,
            dir=wdir,
            mode=mode,
            reinit="finish_previous",
        )
        summary = {}
        _flat("", {"metrics": record.get("metrics", {}), "efficiency": record.get("efficiency", {})}, summary)
        summary.update(
            {
                "accuracy": record.get("accuracy"),
                "n_samples": record.get("n_samples"),
                "n_failed": record.get("n_failed"),
                "n_empty": record.get("n_empty"),
                "key": record["key"],
            }
        )
        run.summary.update(summary)
        samples = record.get("samples") or []
        if logger_cfg.get("log_samples", True) and samples:
            cols = list(samples[0].keys())
            table = wandb.Table(columns=cols, data=[[str(s.get(c)) for c in cols] for s in samples])
            run.log({"samples": table})
        info = {"run_id": run.id, "dir": run.dir, "mode": mode}
        run.finish()
        return info
    except Exception as e:  # never lose a cell because of the logger
        print(f"vtbench: warning: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
