"""Kill anywhere, lose nothing: SIGKILL a sweep (between cells and inside a cell's benchmark) and a
single cell at seeded random points; the reruns complete with no lost or duplicated record, reuse the
per-sample answers of the interrupted cell, and end with the records and the table of an uninterrupted
run. Two concurrent sweeps on one store leave one valid record per cell. A parallel sweep (`run.workers=2`)
killed by SIGKILL leaves no worker behind and resumes; one of its workers killed fails only its cell, which
the rerun resumes."""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability.helpers import (
    cell_args, comparable, kill_when, our_lines, leftovers, progress, records, run, start, tables_without_timing,
)

LIMIT = 6
SWEEP = ["-m", "method=none,random"]
PARALLEL = ["-m", "method=none,random", "run.workers=2"]  # the reference's cells, in two worker processes


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


def _workers(pid: int) -> list[psutil.Process]:
    """The sweep's worker processes: forked by its fork server (named `vtbench-worker`), or started as
    processes of their own (`python -m harness.workers`); the fork server itself is not a worker."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.name() == "vtbench-worker" or ("harness.workers" in cmd and "--fork-server" not in cmd):
                out.append(child)
        except psutil.Error:
            pass
    return out


def _answers(store, key: str) -> int:
    try:
        return max(0, (Path(store) / "partial" / f"{key}.jsonl").read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


@pytest.mark.slow
def test_parallel_sweep_killed_leaves_no_worker_and_resumes(tiny_checkpoint, prepared_data, reference, tmp_path):
    rng = random.Random(11)
    store = tmp_path / "store"
    args = [*PARALLEL, *cell_args(tiny_checkpoint, prepared_data, store, LIMIT)]
    a = rng.randint(1, LIMIT - 1)
    seen: dict[int, psutil.Process] = {}
    every: dict[int, psutil.Process] = {}  # the workers, the fork server, anything else the sweep started

    def cond():
        seen.update({w.pid: w for w in _workers(proc.pid)})
        try:
            every.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.Error:
            pass
        return progress(store)[0] == 0 and progress(store)[1] >= a

    proc = start(args, tmp_path)
    assert kill_when(proc, cond), "the sweep finished before the kill point"
    assert proc.returncode == -signal.SIGKILL and len(seen) == 2, seen
    assert len(every) >= 3  # the two workers and their fork server
    _, alive = psutil.wait_procs(list(every.values()), timeout=10)
    assert not alive, alive  # the workers and the server died with the sweep: nothing left running
    assert progress(store)[0] == 0  # ... mid-cell, at once: no worker went on to finish its cell
    n_answers = progress(store)[1]
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sum(r["n_resumed"] for r in records(store).values()) >= n_answers >= a  # no answer lost
    _assert_same_as_reference(store, reference)


@pytest.mark.slow
def test_parallel_sweep_with_a_killed_worker_goes_on_and_resumes_its_cell(
    tiny_checkpoint, prepared_data, reference, tmp_path
):
    rng = random.Random(12)
    store = tmp_path / "store"
    args = [*PARALLEL, *cell_args(tiny_checkpoint, prepared_data, store, LIMIT)]
    a = rng.randint(1, LIMIT - 1)
    proc = start(args, tmp_path)
    victim = None
    t0 = time.monotonic()
    while victim is None and proc.poll() is None and time.monotonic() - t0 < 300:
        for w in _workers(proc.pid):  # a worker holding a cell's lock with >= a answers on disk
            try:
                held = [Path(f.path).stem for f in w.open_files() if Path(f.path).parent == store / "locks"]
            except psutil.Error:
                continue
            if held and _answers(store, held[0]) >= a:
                victim = (held[0], w)
                w.kill()
                break
        time.sleep(0.01)
    assert victim is not None, "the sweep finished before the kill point"
    key, _ = victim
    killed_at = _answers(store, key)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]  # the other cell completed; the killed one is named
    last = our_lines(err)[-1]
    assert last.startswith("vtbench: 1 of 2 cells failed") and "worker process died (killed by SIGKILL)" in last, last
    assert progress(store)[0] == 1 and _answers(store, key) >= killed_at >= a  # its answers are kept
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert records(store)[key]["n_resumed"] >= killed_at
    _assert_same_as_reference(store, reference)
