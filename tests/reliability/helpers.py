"""Helpers of the reliability tests: run `vtbench` as a subprocess on an isolated store, kill it at
chosen points, and compare stores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

VTBENCH = os.path.join(os.path.dirname(sys.executable), "vtbench")


def env_for(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", VTBENCH_OUTPUTS=str(Path(tmp_path) / "hydra"))
    env.pop("VTBENCH_STORE", None)
    return env


def cell_args(ckpt: str, data_dir: str, store, limit: int = 6) -> list[str]:
    return [f"model.pretrained={ckpt}", f"data_dir={data_dir}", f"store.dir={store}", "logger=none",
            f"run.limit={limit}", "run.batch_size=1", "run.efficiency.enabled=false"]


def start(args: list[str], tmp_path, **kw) -> subprocess.Popen:
    return subprocess.Popen([VTBENCH, *args], env=env_for(tmp_path), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run(args: list[str], tmp_path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VTBENCH, *args], env=env_for(tmp_path), cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def progress(store) -> tuple[int, int]:
    """(complete records, partial answers on disk) of a store."""
    store = Path(store)
    n_rec = 0
    for p in (store / "records").glob("*.json"):
        try:
            n_rec += json.loads(p.read_text()).get("status") == "complete"
        except (OSError, ValueError):
            pass
    n_part = 0
    for p in (store / "partial").glob("*.jsonl"):
        try:
            n_part += max(0, p.read_bytes().count(b"\n") - 1)  # the first line is the file's header
        except OSError:
            pass
    return n_rec, n_part


def kill_when(proc: subprocess.Popen, cond, timeout: float = 300, sig=signal.SIGKILL) -> bool:
    """Send `sig` to `proc` as soon as `cond()` holds; False if the process ended first. The output
    is left in `proc.out` / `proc.err`. (Pipes are drained by threads so a chatty child never blocks.)"""
    import threading

    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()), daemon=True)
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err")) if s is not None]
    for r in readers:
        r.start()
    t0 = time.monotonic()
    killed = False
    while proc.poll() is None:
        if cond():
            proc.send_signal(sig)
            killed = True
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError("vtbench did not reach the kill point")
        time.sleep(0.01)
    proc.wait(timeout=120)
    for r in readers:
        r.join(timeout=60)
    proc.out, proc.err = "".join(chunks["out"]), "".join(chunks["err"])
    return killed


def our_lines(stderr: str) -> list[str]:
    """vtbench's own message lines (progress bars redraw with carriage returns, so split on those too)."""
    import re

    return [ln.strip() for ln in re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)) if ln.strip().startswith("vtbench:")]


def records(store) -> dict[str, dict]:
    out = {}
    for p in sorted((Path(store) / "records").glob("*.json")):
        out[p.stem] = json.loads(p.read_text())
    return out


def comparable(rec: dict) -> dict:
    """What must be identical between an interrupted and an uninterrupted run of a cell."""
    keep = ("key", "status", "cell", "method_params", "primary_metric", "accuracy", "metrics", "n_samples",
            "n_failed", "n_empty", "failures", "n_nonfinite", "nonfinite", "samples", "budget")
    return {k: rec.get(k) for k in keep}


def tables_without_timing(store) -> dict:
    from harness.report import build_tables

    tables, corrupt = build_tables(str(store))
    out = {}
    for k, t in tables.items():
        timing = [c for c in t.columns if c.startswith(("prefill_", "decode_")) or c == "peak_mem_mb"]
        t = t.drop(columns=timing)
        t = t.astype(object).where(t.notna(), None)  # NaN != NaN: compare missing values as None
        out[k] = t.to_dict(orient="list")
    return {"tables": out, "corrupt": corrupt}


def leftovers(store) -> list[str]:
    """Files that must not remain after a completed run: temp files, partial answers."""
    store = Path(store)
    bad = [str(p) for p in store.rglob(".*.tmp")]
    bad += [str(p) for p in (store / "partial").glob("*") if p.stat().st_size > 0 or p.suffix == ".jsonl"]
    return bad
