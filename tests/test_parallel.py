"""Parallel answering (`harness.workers`) and timing alone (`harness.execution`), the fast part: the device
lock's protocol between holders (threads with their own lock files' descriptors behave as processes do:
`flock` locks belong to open file descriptions), the lock of a killed holder, one computation per
calibration artefact, the thread and worker plans, and `run.workers` / `run.threads` as validated values
outside the record key. The subprocess sweeps (parallel vs serial record by record, SIGKILL of the sweep and
of one worker) are in tests/reliability/test_parallel_sweep.py and test_kill_resume.py (`slow`)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from harness import execution as E

WAIT = 0.25  # how long "does not happen" is watched for


def _locks(tmp_path, n):
    return [E.DeviceLock("cpu", tmp_path) for _ in range(n)]


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_timing_waits_for_computing_holders_and_then_runs_alone(tmp_path):
    computing, timing, newcomer = _locks(tmp_path, 3)
    got_ex, release_ex, got_sh = threading.Event(), threading.Event(), threading.Event()

    def time_it():
        with timing.exclusive():
            got_ex.set()
            release_ex.wait(10)

    def compute():
        with newcomer.shared():
            got_sh.set()

    with computing.shared():
        t1 = _in_thread(time_it)
        assert not got_ex.wait(WAIT)  # another holder computes: the timing part waits
        t2 = _in_thread(compute)
        assert not got_sh.wait(WAIT)  # a timing part waits: no new computation starts (the gate)
    assert got_ex.wait(5)  # the computing holder left: timing runs
    assert not got_sh.wait(WAIT)  # ... alone, while it runs
    release_ex.set()
    assert got_sh.wait(5)
    t1.join(5)
    t2.join(5)


def test_computing_holders_share_the_device(tmp_path):
    a, b = _locks(tmp_path, 2)
    inside = threading.Event()

    def other():
        with b.shared():
            inside.set()

    with a.shared(), a.shared():  # re-entrant
        _in_thread(other).join(5)
        assert inside.is_set()


def test_yield_point_lets_a_waiting_timing_part_go_first(tmp_path):
    """A long computation that yields between batches holds a timing part up by one batch at most, and
    computes nothing while the timing runs."""
    computing, timing = _locks(tmp_path, 2)
    batches: list[float] = []
    window: list[float] = []
    started = threading.Event()

    def compute():
        with computing.shared():
            started.set()
            for _ in range(40):
                time.sleep(0.02)  # a batch
                batches.append(time.monotonic())
                computing.yield_point()

    def time_it():
        started.wait(5)
        time.sleep(0.1)
        with timing.exclusive():
            window.append(time.monotonic())
            time.sleep(0.3)
            window.append(time.monotonic())

    t = _in_thread(compute)
    _in_thread(time_it).join(10)
    t.join(10)
    start, end = window
    assert batches[-1] > end  # the timing part did not wait for the whole computation
    assert not [b for b in batches if start < b < end]  # and nothing was computed while it ran
    assert start - max(b for b in batches if b <= start) < 0.2  # it waited one batch, not the rest


def test_exclusive_inside_shared_and_idle_give_the_shared_hold_up(tmp_path):
    me, timing = _locks(tmp_path, 2)
    got = threading.Event()

    def time_it():
        with timing.exclusive():
            got.set()

    with me.shared():
        with me.exclusive():  # this holder's own timing part (the probe inside a cell)
            t = _in_thread(time_it)
            assert not got.wait(WAIT)
        assert not got.wait(WAIT)  # back to shared: the other timing part still waits
        with me.idle():  # waiting for another process's calibration: not computing
            assert got.wait(5)
        t.join(5)


HOLD = """
import sys, time
from pathlib import Path
from harness.execution import DeviceLock
lock = DeviceLock("cpu", Path(sys.argv[1]))
with lock.shared():
    print("holding", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_holder_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        (timing,) = _locks(tmp_path, 1)
        got = threading.Event()

        def time_it():
            with timing.exclusive():
                got.set()

        t = _in_thread(time_it)
        assert not got.wait(WAIT)
        holder.kill()
        holder.wait(10)
        assert got.wait(10)  # the kernel released it with the process: never stale
        t.join(5)
    finally:
        holder.kill()
        holder.wait()


def test_an_unusable_lock_folder_costs_exclusivity_not_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    lock = E.DeviceLock("cpu", blocker / "locks")  # a file on the way
    assert not lock.available
    with lock.shared(), lock.exclusive():
        lock.yield_point()
    assert E.latency_note(lock, 2).startswith("unlocked")


def test_device_slots(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert E.device_slot("cpu") == "cpu"
    assert E.device_slot("cuda") == "cuda-3" and E.device_slot("cuda:1") == "cuda-5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert E.device_slot("cuda:2") == "cuda-2"


# ---- one computation per calibration artefact --------------------------------------------------------------
def test_concurrent_users_of_one_calibration_artefact_compute_it_once(tmp_path):
    from methods._shared.calibration import load_or_compute

    calls = []

    def compute():
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return {"ranking": [1, 0], "scores": [0.2, 0.1]}

    parts = {"model_id": "m", "data_id": "d", "n_samples": 2, "seed": 0, "method": "test", "kind": "x"}
    out = []
    threads = [_in_thread(lambda: out.append(load_or_compute(parts, compute, tmp_path))) for _ in range(3)]
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(out) == 3
    assert all(o["ranking"] == [1, 0] and o["path"] == out[0]["path"] for o in out)


# ---- threads and workers -----------------------------------------------------------------------------------
@pytest.fixture
def cores(monkeypatch):
    def set_cores(n, default=None):
        monkeypatch.setattr(E, "usable_cores", lambda: n)
        monkeypatch.setattr(E, "_DEFAULT_THREADS", [default or n])

    return set_cores


def test_worker_threads_share_the_cores(cores):
    cores(2)
    assert E.worker_threads(2, None) == 1  # the default: one thread per worker, one worker per core
    cores(16)
    assert E.worker_threads(4, None) == 4 and E.worker_threads(32, None) == 1
    assert E.worker_threads(4, 3) == 3  # run.threads wins
    cores(16, default=2)  # OMP_NUM_THREADS=2: never more than a serial run would use
    assert E.worker_threads(2, None) == 2


def _combos(tmp_path, *extra):
    return [[f"store.dir={tmp_path}", f"method={m}", *extra] for m in ("none", "random")]


def test_plan_of_a_sweep(cores, tmp_path):
    from harness.workers import plan

    cores(2)
    p = plan(_combos(tmp_path, "run.workers=auto"), todo=2)
    assert (p.workers, p.threads, p.timing_threads, p.gpus) == (2, 1, 2, [])  # one 1-thread worker per core
    assert plan(_combos(tmp_path, "run.workers=auto"), todo=1).workers == 1  # never more workers than cells to do
    cores(8)
    p = plan(_combos(tmp_path, "run.workers=2"), todo=2)
    assert (p.workers, p.threads, p.timing_threads) == (2, 4, 8)
    p = plan(_combos(tmp_path, "run.workers=3", "run.threads=1"), todo=3)
    assert (p.workers, p.threads, p.timing_threads) == (3, 1, 1)  # the user's threads for timing too
    assert "3 worker processes" in p.describe()


def test_run_workers_cannot_vary_within_a_sweep(tmp_path):
    from harness.config import ConfigError
    from harness.workers import plan

    combos = _combos(tmp_path, "run.workers=1")[:1] + _combos(tmp_path, "run.workers=2")[1:]
    with pytest.raises(ConfigError, match=r"^run\.workers=1,2: run\.workers cannot vary within a sweep"):
        plan(combos, todo=2)


@pytest.mark.bad_input
@pytest.mark.parametrize("key,value", [
    ("run.workers", "0"), ("run.workers", "-1"), ("run.workers", "1.5"), ("run.workers", "2.0"),
    ("run.workers", "nan"), ("run.workers", "inf"), ("run.workers", "true"), ("run.workers", "null"),
    ("run.workers", "many"), ("run.workers", "'2'"),
    ("run.threads", "0"), ("run.threads", "1.0"), ("run.threads", "nan"), ("run.threads", "false"),
    ("run.threads", "auto"),
])
def test_bad_workers_and_threads_are_one_line_errors(key, value):
    from harness.config import ConfigError, compose_config, validate

    with pytest.raises(ConfigError) as e:
        validate(compose_config([f"{key}={value}"]))
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "\n" not in msg and key in msg.split(":", 1)[1]


@pytest.mark.bad_input
def test_a_sweep_with_bad_workers_exits_2_in_one_line_with_nothing_written(tmp_path, capsys):
    from harness.cli.main import main

    store = tmp_path / "store"
    rc = main(["-m", "method=none,random", "run.workers=0,2", f"store.dir={store}", "logger=none"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    # the line names the cell it was found in, then the value (harness.sweep.sweep_error_line)
    assert rc == 2 and len(err) == 1 and err[0].startswith("vtbench: error: [method=none run.workers=0] run.workers=0:"), err
    assert not store.exists()


def test_workers_and_threads_are_not_part_of_the_record_key(tmp_path):
    from harness.config import compose_config, resolved
    from harness.results import record_key

    keys = {record_key(resolved(compose_config([f"store.dir={tmp_path}", "method=random", *extra])))
            for extra in ([], ["run.workers=1"], ["run.workers=4"], ["run.workers=auto", "run.threads=3"])}
    assert len(keys) == 1


def test_the_pool_hands_out_calibrating_cells_first_and_never_two_of_one_calibration(tmp_path):
    """Cells that compute a calibration on first use start first (they are the long ones); a second cell of
    the same calibration waits until the first one is done (it would only wait for its file lock), unless
    nothing else is left."""
    from types import SimpleNamespace

    from harness.workers import Plan, WorkerPool

    pool = WorkerPool(Plan(workers=2, threads=1, timing_threads=1), log_dir=tmp_path)
    busy = SimpleNamespace(task=None)
    pool.workers = [busy]  # stands for a worker process (only `.task` is read)
    cells = [{"num": i, "calibration": c} for i, c in enumerate([None, "X", "X", None, "Y"])]
    pool.queue = list(cells)
    order = []

    def take():
        t = pool._next()
        if t is not None:
            order.append(t["num"])
            if t["calibration"] and t["calibration"] not in pool.calibrated:
                pool.calibrating.add(t["calibration"])
            busy.task = t
        return t

    assert [take()["num"] for _ in range(4)] == [1, 4, 0, 3]  # X and Y compute first, then the sweep's order
    assert take() is None  # only cell 2 is left, and X is being computed by a busy worker: it waits
    pool._finished(cells[1])
    assert take()["num"] == 2 and not pool.queue
    pool.queue, pool.calibrated, pool.calibrating = [{"num": 9, "calibration": "Z"}], set(), {"Z"}
    busy.task = None  # nothing else runs: it goes (and waits for the lock) rather than never
    assert take()["num"] == 9


# ---- the fork server -----------------------------------------------------------------------------------
def test_the_fork_server_is_started_only_for_sweeps_that_may_use_workers(cores, monkeypatch):
    from harness.workers import fork_server_wanted

    monkeypatch.delenv("VTBENCH_WORKERS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cores(2)
    assert fork_server_wanted(["method=none,fastv"])
    assert not fork_server_wanted(["method=none,fastv", "run.workers=1"])
    assert fork_server_wanted(["method=none,fastv", "run.workers=1", "run.workers=2"])  # the last value wins
    monkeypatch.setenv("VTBENCH_WORKERS", "1")
    assert not fork_server_wanted(["method=none,fastv"])
    assert fork_server_wanted(["method=none,fastv", "run.workers=auto"])
    monkeypatch.delenv("VTBENCH_WORKERS")
    assert not fork_server_wanted(["method=none", "run.limit=3"])  # one cell: no worker
    assert not fork_server_wanted(["method=none,fastv", "run.workers=abc"])  # refused by the validation first
    assert fork_server_wanted(["method=none,fastv", "run.workers=3"])
    assert fork_server_wanted(["method=none", "--next", "method=fastv"])
    assert fork_server_wanted(["experiment=repro_fastv_llava15_7b"])  # its table may hold many cells
    cores(1)
    assert not fork_server_wanted(["method=none,fastv"])  # one core, no GPU: one worker at most


def test_a_stopped_fork_server_falls_back_to_worker_processes(tmp_path):
    """A fork server that is gone (killed, or failed to import) is noticed at the next worker's start: one
    line, the server let go, and the pool starts that worker as a process of its own."""
    import io
    import os

    from harness.workers import ForkServer, Plan, WorkerPool

    server = ForkServer()
    server.proc.kill()
    server.proc.wait()
    out = io.StringIO()
    pool = WorkerPool(Plan(workers=2, threads=1, timing_threads=1), log_dir=tmp_path, out=out, server=server)
    pool._alive = os.pipe()
    try:
        assert pool._fork(0, dict(os.environ), tmp_path / "worker-0.log") is None
    finally:
        for fd in pool._alive:
            os.close(fd)
    assert pool.server is None and not pool.workers
    (line,) = out.getvalue().splitlines()
    assert "fork server stopped" in line and "process of its own" in line
