"""Scale-out: a two-cell sweep through hydra-submitit-launcher's `submitit_local` launcher (the code path
SLURM uses), each cell in its own process, both records written to the shared store."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_submitit_local_two_parallel_cells(tiny_checkpoint, data_dir, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, VTBENCH_OUTPUTS=str(tmp_path / "multirun"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "harness.cli", "-m", "hydra/launcher=submitit_local", "method=none,random",
           "run.limit=2", f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={store}",
           f"logger.dir={tmp_path / 'wandb'}", "logger.group=sweep-submitit", "run.efficiency.enabled=false",
           "hydra.launcher.timeout_min=15", "hydra.launcher.cpus_per_task=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep" in proc.stderr + proc.stdout
    # what the user sees although the cells ran in other processes: a result line per cell, the progress
    # bar with its count, and the comparison table at the end
    for m in ("none", "random"):
        assert f"[vtbench] method={m}: exact_match=" in proc.stderr, proc.stderr[-3000:]
    assert "[########################] 2/2 cells · 2 evaluated, 0 reused, 0 failed" in proc.stderr
    assert "vtbench sweep" in proc.stdout and proc.stdout.count("complete") == 2

    records = [json.loads(p.read_text()) for p in sorted((store / "records").glob("*.json"))]
    assert sorted(r["cell"]["method"]["name"] for r in records) == ["none", "random"]
    assert all(r["status"] == "complete" and r["n_samples"] == 2 for r in records)
    assert all(r["config"]["logger"]["group"] == "sweep-submitit" for r in records)

    # two submitit jobs (one process each, launched together), each ran exactly one cell
    jobs = glob.glob(str(tmp_path / "multirun" / "*" / "*" / ".submitit" / "*" / "*_log.err"))
    assert len(jobs) == 2, jobs
    keys = sorted(r["key"] for r in records)
    logged = sorted(k for j in jobs for k in keys if f"cell {k}" in Path(j).read_text())
    assert logged == keys
    # the cell runs are grouped by sweep in W&B
    blobs = [open(p, "rb").read() for p in glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))]
    assert len(blobs) == 2 and all(b"sweep-submitit" in b for b in blobs)
