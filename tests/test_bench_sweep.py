"""The bench's `sweep` part (`harness/bench/sweep.py`): serial vs parallel workers on one small sweep. The
comparison logic on made-up records (fast), and the part itself end to end on the quick settings (`slow`; no
timing assertions: the numbers of a shared machine are reported, not tested)."""
from __future__ import annotations

import json

import pytest

from harness.bench.sweep import compare_sweeps, render_sweep


def _rec(key, method, preds, prefill, decode, flops=1.0):
    lat = {"prefill_ms": dict(zip(("median", "q1", "q3", "n"), prefill)),
           "decode_ms_per_token": dict(zip(("median", "q1", "q3", "n"), decode)), "taken": "alone: ..."}
    return {"key": key, "cell": {"method": {"name": method}}, "accuracy": 0.5,
            "samples": [{"prediction": p} for p in preds], "efficiency": {"latency": lat, "flops": {"t": flops}}}


def _run(wall, workers, recs):
    return {"wall_s": wall, "cells": len(recs), "cells_per_min": 60 * len(recs) / wall, "workers": workers,
            "threads": 1, "timing_threads": 1, "cell_seconds": wall, "records": {r["key"]: r for r in recs}}


def test_compare_sweeps_checks_medians_against_the_serial_iqr_and_answers():
    serial = _run(120.0, 1, [_rec("a", "none", ["x", "y"], (10, 9, 12, 12), (5, 4, 6, 96)),
                             _rec("b", "fastv", ["x", "z"], (8, 7, 9, 12), (4, 3, 5, 96))])
    parallel = _run(60.0, 2, [_rec("a", "none", ["x", "y"], (11, 10, 13, 12), (7, 6, 8, 96)),
                              _rec("b", "fastv", ["x", "w"], (7.5, 7, 9, 12), (4.5, 4, 5, 96), flops=2.0)])
    out = compare_sweeps(serial, parallel, "vtbench -m ...")
    assert out["gain"] == 2.0 and out["within_iqr"] == 2 and out["decode_within_iqr"] == 1
    a, b = out["rows"]
    assert a["same_answers"] and a["same_flops"] and not a["decode_ms_per_token"]["within_iqr"]
    assert not b["same_answers"] and not b["same_flops"]  # any difference is shown, never hidden
    assert "records" not in out["serial"]  # the report keeps the figures, not the records
    md = "\n".join(render_sweep(out))
    assert "## Parallel sweep" in md and "**2.00x**" in md and "**2 of 2** cells" in md and "**NO**" in md
    json.dumps(out)  # the bench's JSON report holds it as is


@pytest.mark.slow
def test_sweep_part_runs_both_ways(tmp_path):
    from harness.cli import bench as bench_cli
    from harness.execution import usable_cores

    bench_cli.run(["--quick", "--parts", "sweep", "--out", str(tmp_path), "--threads", "1", "--machine", "m"])
    data = json.loads((tmp_path / "m.json").read_text())["sweep"]
    assert [data["serial"]["workers"], data["parallel"]["workers"]] == [1, min(usable_cores(), 4)]
    assert data["serial"]["cells"] == data["parallel"]["cells"] == data["serial_again"]["cells"] == 4 and len(data["rows"]) == 4
    assert all(r["same_answers"] and r["same_flops"] and r["taken"].startswith("alone") for r in data["rows"])
    assert data["gain"] > 0 and "## Parallel sweep" in (tmp_path / "m.md").read_text()


def test_the_serial_run_again_is_the_noise_baseline():
    """A serial run repeated after the parallel one: how often it lands inside its own earlier range is shown
    beside the parallel figure (the bar a parallel run can be held to on the same machine)."""
    serial = _run(120.0, 1, [_rec("a", "none", ["x"], (10, 9, 12, 12), (5, 4, 6, 96)),
                             _rec("b", "fastv", ["x"], (8, 7, 9, 12), (4, 3, 5, 96))])
    parallel = _run(60.0, 2, [_rec("a", "none", ["x"], (11, 10, 13, 12), (5, 4, 6, 96)),
                              _rec("b", "fastv", ["x"], (9.5, 9, 10, 12), (4, 3, 5, 96))])
    again = _run(118.0, 1, [_rec("a", "none", ["x"], (13, 12, 14, 12), (5, 4, 6, 96)),
                            _rec("b", "fastv", ["x"], (8.5, 8, 9, 12), (4, 3, 5, 96))])
    out = compare_sweeps(serial, parallel, "vtbench -m ...", again)
    assert (out["within_iqr"], out["again_within_iqr"], out["again_decode_within_iqr"]) == (1, 1, 2)
    assert out["rows"][0]["prefill_ms"]["again_within_iqr"] is False and "records" not in out["serial_again"]
    md = "\n".join(render_sweep(out))
    assert "| serial again | 1 |" in md and "for **1 of 2** cells" in md and "| none | 10.0 (9.0-12.0) | 13.0" in md
    json.dumps(out)
    assert "serial_again" not in compare_sweeps(serial, parallel)  # optional: the two-run comparison as before
