"""The sweep monitor: progress bar and ETA, one line per finished cell, reused cells, the final table."""
from __future__ import annotations

import io

from harness.results import ResultsStore
from harness.sweep_monitor import SweepMonitor, bar
from tests.records import make_record


def test_progress_lines_count_reused_and_finished_cells(tmp_path):
    store = ResultsStore(tmp_path)
    recs = [make_record(m, (1.0, 0.0), flops=2e9, seed=i) for i, m in enumerate(("none", "fastv", "tome"))]
    store.write(recs[0])  # complete before the sweep: reused
    out = io.StringIO()
    mon = SweepMonitor([(f"method={r['cell']['method']['name']}", store.record_path(r["key"]), r["key"]) for r in recs],
                       interval=0.05, out=out).start()
    assert mon.reused == 1
    store.write(recs[1])
    failed = make_record("tome", (1.0, 0.0), seed=2, status="failed")
    store.write(failed)
    mon.stop()
    text = out.getvalue()
    assert "sweep of 3 cells (1 already complete: reused)" in text
    assert "[vtbench] method=fastv: exact_match=0.5000, n=2, prefill 2 GFLOPs" in text
    assert "[vtbench] method=tome: FAILED: RuntimeError: boom" in text
    assert text.rstrip().endswith("3/3 cells · 2 evaluated, 1 reused, 1 failed · elapsed 0:00 · done")
    table = io.StringIO()
    mon.summary(out=table)
    rows = table.getvalue()
    assert rows.count("complete") == 2 and "failed" in rows and recs[1]["key"] in rows


def test_bar_and_eta():
    assert bar(0, 4, 8) == "[........]" and bar(2, 4, 8) == "[####....]" and bar(4, 4, 8) == "[########]"
