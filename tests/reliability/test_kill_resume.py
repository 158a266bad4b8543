"""Kill anywhere, lose nothing: SIGKILL a sweep (between cells and inside a cell's benchmark) and a
single cell at seeded random points; the reruns complete with no lost or duplicated record, reuse the
per-sample answers of the interrupted cell, and end with the records and the table of an uninterrupted
run. Two concurrent sweeps on one store leave one valid record per cell."""
from __future__ import annotations

import random
import signal

import pytest

from tests.reliability.helpers import (
    cell_args, comparable, kill_when, our_lines, leftovers, progress, records, run, start, tables_without_timing,
)

LIMIT = 6
SWEEP = ["-m", "method=none,random"]


@pytest.fixture(scope="module")
def prepared_data(data_dir):
    from harness.benchmarks.prepare import prepare_shapes

    prepare_shapes(data_dir)  # generated once here, so the subprocesses below only read it
    return data_dir


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, prepared_data, tmp_path_factory):
    """The uninterrupted sweep."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run([*SWEEP, *cell_args(tiny_checkpoint, prepared_data, tmp / "store", LIMIT)], tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = records(tmp / "store")
    assert len(recs) == 2 and all(r["status"] == "complete" and r["n_samples"] == LIMIT for r in recs.values())
    return tmp / "store"


def _assert_same_as_reference(store, reference):
    got, want = records(store), records(reference)
    assert sorted(got) == sorted(want)  # nothing lost, nothing duplicated (one file per cell key)
    for key in want:
        assert comparable(got[key]) == comparable(want[key]), key
    assert tables_without_timing(store) == tables_without_timing(reference)
    assert not leftovers(store)


@pytest.mark.slow
def test_sweep_killed_between_and_inside_cells_resumes_to_the_same_result(
    tiny_checkpoint, prepared_data, reference, tmp_path
):
    rng = random.Random(8)
    store = tmp_path / "store"
    args = [*SWEEP, *cell_args(tiny_checkpoint, prepared_data, store, LIMIT)]
    a, b = rng.randint(1, LIMIT - 1), rng.randint(1, LIMIT - 1)
    kills = [
        ("inside cell 1", lambda: progress(store)[0] == 0 and progress(store)[1] >= a),
        ("between cells", lambda: progress(store) == (1, 0)),
        ("inside cell 2", lambda: progress(store)[0] == 1 and progress(store)[1] >= b),
    ]
    seen = []
    for name, cond in kills:
        proc = start(args, tmp_path)
        assert kill_when(proc, cond), f"the sweep finished before the kill point {name!r}"
        assert proc.returncode == -signal.SIGKILL
        seen.append((name, progress(store)))
    assert [s[1][0] for s in seen] == [0, 1, 1], seen  # the kills hit where intended
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # the interrupted cells reused their per-sample answers: cell 1 (none) resumed after the first
    # kill with >= a answers, cell 2 (random) after the third with >= b
    resumed = {r["cell"]["method"]["name"]: r["n_resumed"] for r in records(store).values()}
    assert resumed["none"] >= a and resumed["random"] >= b, (resumed, a, b)
    _assert_same_as_reference(store, reference)


@pytest.mark.slow
def test_single_cell_killed_mid_benchmark_resumes(tiny_checkpoint, prepared_data, reference, tmp_path):
    rng = random.Random(3)
    store = tmp_path / "store"
    args = ["method=random", *cell_args(tiny_checkpoint, prepared_data, store, LIMIT)]
    first = rng.randint(1, LIMIT // 2)
    second = rng.randint(first + 1, LIMIT - 1)
    for target in (first, second):
        proc = start(args, tmp_path)
        assert kill_when(proc, lambda: progress(store)[1] >= target)
        assert progress(store)[0] == 0  # no record yet, only per-sample answers
    done_before = progress(store)[1]
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = records(store).values()
    assert rec["n_resumed"] == done_before >= second
    want = next(r for r in records(reference).values() if r["cell"]["method"]["name"] == "random")
    assert comparable(rec) == comparable(want)
    assert not leftovers(store)


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_and_the_cell_resumes(tiny_checkpoint, prepared_data, reference, tmp_path):
    store = tmp_path / "store"
    args = ["method=none", *cell_args(tiny_checkpoint, prepared_data, store, LIMIT)]
    proc = start(args, tmp_path)
    assert kill_when(proc, lambda: progress(store)[1] >= 2, sig=signal.SIGINT)
    assert proc.returncode == 130
    stderr = proc.err
    ours = our_lines(stderr)
    assert len(ours) == 1 and "interrupted" in ours[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert progress(store)[0] == 0 and progress(store)[1] >= 2
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = records(store).values()
    assert rec["n_resumed"] >= 2
    want = next(r for r in records(reference).values() if r["cell"]["method"]["name"] == "none")
    assert comparable(rec) == comparable(want)


@pytest.mark.slow
def test_two_concurrent_sweeps_share_a_store(tiny_checkpoint, prepared_data, reference, tmp_path):
    store = tmp_path / "store"
    common = cell_args(tiny_checkpoint, prepared_data, store, LIMIT)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1 = start(["-m", "method=none,random", *common], tmp_path / "a")
    p2 = start(["-m", "method=random,none", *common], tmp_path / "b")
    outs = [p.communicate(timeout=600) for p in (p1, p2)]
    assert p1.returncode == 0 and p2.returncode == 0, [o[1][-2000:] for o in outs]
    _assert_same_as_reference(store, reference)
    # each cell was evaluated by one process; the other waited for it or found it complete
    logs = outs[0][1] + outs[1][1]
    assert logs.count("reusing it") >= 2, logs[-3000:]
