"""A sweep answered by parallel workers (`run.workers=2`, `harness.workers`) writes the records of the serial
sweep: the same keys, answers, accuracies, counted FLOPs and visual-token counts, record by record (latency
aside); each record says how it ran (worker, threads) and that its latency was taken alone. Each run counts
its FLOPs afresh (its own FLOPs cache), so equal counts are two measurements, not one reused."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.reliability.helpers import VTBENCH, comparable, env_for, leftovers, records

CELLS = ["-m", "method=none,random,fastv,tome"]


@pytest.fixture(scope="module")
def prepared_data(data_dir):
    from harness.benchmarks.prepare import prepare_shapes

    prepare_shapes(data_dir)
    return data_dir


def _sweep(tmp_path, name, ckpt, data, workers):
    store = tmp_path / name / "store"
    args = [*CELLS, f"model.pretrained={ckpt}", f"data_dir={data}", f"store.dir={store}", "logger=none",
            "run.limit=6", "run.batch_size=2", f"run.workers={workers}", "run.efficiency.probe_size=2",
            "run.efficiency.repeats=2", "run.efficiency.warmup=0", "run.efficiency.decode_tokens=2"]
    env = env_for(tmp_path / name) | {"VTBENCH_CACHE": str(tmp_path / name / "cache")}
    out = subprocess.run([VTBENCH, *args], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return store, out.stderr


def _measured(rec: dict) -> dict:
    """The efficiency figures that must not depend on how the sweep ran (everything but timing)."""
    eff = rec["efficiency"]
    return {"flops": eff["flops"], "kv_cache_bytes": eff["kv_cache_bytes"],
            **{k: eff[k] for k in eff if k.startswith("visual_tokens")}}


@pytest.mark.slow
def test_parallel_sweep_writes_the_serial_records(tiny_checkpoint, prepared_data, tmp_path):
    serial, _ = _sweep(tmp_path, "serial", tiny_checkpoint, prepared_data, 1)
    parallel, log = _sweep(tmp_path, "parallel", tiny_checkpoint, prepared_data, 2)
    want, got = records(serial), records(parallel)
    assert len(want) == 4 and sorted(got) == sorted(want)  # the same cells under the same keys
    for key in want:
        assert comparable(got[key]) == comparable(want[key]), key  # answers, accuracy, counts
        assert got[key]["efficiency"]["flops_layouts_counted"] >= 1  # counted in this run, not reused
        assert _measured(got[key]) == _measured(want[key]), key
    # how each ran: in the sweep's process vs in two single-threaded workers, latency taken alone
    assert {json.dumps(r["execution"]["workers"]) for r in want.values()} == {"1"}
    assert all(r["execution"]["worker"] is None for r in want.values())
    assert {r["execution"]["worker"] for r in got.values()} == {0, 1}
    assert all(r["execution"]["workers"] == 2 and r["environment"]["torch_threads"] == 1 for r in got.values())
    assert {r["execution"]["started"] for r in got.values()} == {"forked"}  # by the sweep's fork server
    for r in [*want.values(), *got.values()]:
        lat = r["efficiency"]["latency"]
        assert lat["taken"].startswith("alone: exclusive cpu lock") and lat["threads"] >= 1
        assert r["execution"]["device_lock"]
    assert log.count("→ worker") == 4
    assert not leftovers(parallel)
