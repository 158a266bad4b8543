"""The per-cell lock of the results store: one evaluator per cell, never stale after SIGKILL, and the
debris of a killed attempt (torn partial line, temp file of an unfinished record write) cleaned up."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from harness.results import ResultsStore

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    store = ResultsStore(tmp_path)
    store.locks.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store.locks / "k.lock")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    entered = threading.Event()

    def take():
        with store.cell_lock("k"):
            entered.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert not entered.wait(1.0)  # held by the other process: we wait
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert entered.wait(10)  # the kernel released it with the process
    t.join(5)


def test_lock_cleans_the_debris_of_a_killed_attempt(tmp_path):
    store = ResultsStore(tmp_path)
    k = "0123456789abcdef"
    store.append_partial(k, [("t", "test", 0, "red"), ("t", "test", 1, "blue")])
    with open(store.partial_path(k), "a") as f:
        f.write('{"task": "t", "split": "te')  # killed mid-append
    store.records.mkdir(parents=True)
    debris = store.records / f".{k}.json.abc123.tmp"  # killed between mkstemp and os.replace
    debris.write_text('{"key": "k", "sta')
    other = store.records / ".other.json.abc123.tmp"  # another cell's write in progress: not ours
    other.write_text("{")
    with store.cell_lock(k):
        assert not debris.exists() and other.exists()
        store.append_partial(k, [("t", "test", 2, "green")])
    # the torn tail was cut, so the next answer is a whole line of its own
    got = {i: r.answer for i, r in store.load_partial(k).items()}
    assert got == {("t", "test", 0): "red", ("t", "test", 1): "blue", ("t", "test", 2): "green"}
    assert store.partial_path(k).read_text().count("\n") == 4  # header + 3 answers
