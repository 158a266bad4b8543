"""How a cell is executed: how many workers share the machine, the torch threads each uses, and the device
lock that lets timing run alone.

**Device lock.** Every vtbench process that computes on a device (loading a model, calibrating, answering,
counting FLOPs) holds that device's lock *shared*; the timing part of the efficiency probe (latency, peak
memory, KV-cache size) holds it *exclusive*, so it runs while no other vtbench process computes on the same
device. The lock is a pair of `flock` files per device and host in a local folder (`$VTBENCH_LOCK_DIR`,
default `<tmp>/vtbench-locks-<uid>`):

* `<host>-<device>.lock`, the lock itself (shared / exclusive);
* `<host>-<device>.gate`, a turnstile that gives the timing part priority: it is held, exclusively, by a
  process waiting for (and then holding) the exclusive lock, and taken briefly by every process entering a
  shared section; so once a timing part waits, no new shared section starts, and the wait lasts at most one
  batch of each process already computing (`yield_point`, called between answer batches).

The kernel releases both when a process dies (SIGKILL included): they are never stale. Shared sections are
leaves: nothing inside them waits for the gate except `yield_point`, which is called only where the process
holds no other lock that a process computing on the device may wait for, and a wait for another process's
calibration gives the shared hold up meanwhile (`idle`); so the device lock and the store's cell and
calibration locks cannot deadlock.

**Threads.** A sweep with one worker keeps torch's own thread count (all cores, or `OMP_NUM_THREADS`);
with N workers on C cores each worker answers with `max(1, C // N)` intra-op threads (one per worker by
default, where N = C), and times with the thread count a serial run would use, since it is then alone on the
device. `run.threads=K` sets both to K. The record states them (`execution`, `efficiency.latency.threads`).
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no device locks (the record says so)
    fcntl = None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def lock_dir() -> Path:
    """The folder of the device locks: local to this machine (never a shared file system, where two nodes'
    processes would wait for each other's timing)."""
    given = os.environ.get("VTBENCH_LOCK_DIR")
    if given:
        return Path(given)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"vtbench-locks-{uid}"


def device_slot(device: str) -> str:
    """The physical device a `run.device` names in this process: `cpu`, `cuda-<id>` (the id as this machine
    numbers it, through `CUDA_VISIBLE_DEVICES`), `mps`."""
    d = str(device or "cpu")
    if d == "auto":
        import torch

        d = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, idx = d.partition(":")
    if kind != "cuda":
        return kind
    i = int(idx or 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"cuda-{visible[i] if i < len(visible) else i}"


class DeviceLock:
    """The shared / exclusive lock of one device (see the module docstring). Per process; re-entrant for
    shared sections; an exclusive section inside a shared one gives the shared lock up while it waits."""

    def __init__(self, slot: str, folder: Path | None = None):
        self.slot = slot
        folder = folder or lock_dir()
        host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
        self.path = folder / f"{host}-{slot}.lock"
        self._gate_path = folder / f"{host}-{slot}.gate"
        self._fd = self._gate = None
        self._depth = 0
        self._mutex = threading.RLock()
        self.available = fcntl is not None
        if self.available:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                self._gate = os.open(self._gate_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # an unusable lock folder costs exclusivity, never the run (the record says so)
                self.available = False

    def _flock(self, fd, op) -> None:
        fcntl.flock(fd, op)

    @contextlib.contextmanager
    def shared(self):
        """Hold the device for computing (other processes compute too; timing waits)."""
        with self._mutex:
            if self.available and self._depth == 0:
                self._enter_shared()
            self._depth += 1
        try:
            yield
        finally:
            with self._mutex:
                self._depth -= 1
                if self.available and self._depth == 0:
                    self._flock(self._fd, fcntl.LOCK_UN)

    def _enter_shared(self) -> None:
        self._flock(self._gate, fcntl.LOCK_EX)  # waits while a timing part waits or runs
        try:
            self._flock(self._fd, fcntl.LOCK_SH)
        finally:
            self._flock(self._gate, fcntl.LOCK_UN)

    def yield_point(self) -> None:
        """Inside a shared section, between two units of work (answer batches): if a timing part waits, step
        aside until it is done. Call it only where this process holds no other lock."""
        with self._mutex:
            if not self.available or self._depth == 0:
                return
            try:
                self._flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # someone holds the gate: a timing part (or a process entering)
                self._flock(self._fd, fcntl.LOCK_UN)
                self._enter_shared()
            else:
                self._flock(self._gate, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def idle(self):
        """Inside a shared section, while waiting for something else (another process's calibration): give
        the shared hold up, so a timing part need not wait for this wait; take it back after."""
        with self._mutex:
            held = self.available and self._depth > 0
            if held:
                self._flock(self._fd, fcntl.LOCK_UN)
        try:
            yield
        finally:
            if held:
                with self._mutex:
                    self._enter_shared()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the device alone (timing); gives up this process's own shared hold while waiting."""
        with self._mutex:
            if self.available:
                if self._depth:
                    self._flock(self._fd, fcntl.LOCK_UN)
                self._flock(self._gate, fcntl.LOCK_EX)
                self._flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with self._mutex:
                if self.available:
                    # back to shared (if inside a shared section) before the gate lets anyone else in
                    self._flock(self._fd, fcntl.LOCK_SH if self._depth else fcntl.LOCK_UN)
                    self._flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._gate):
            if fd is not None:
                os.close(fd)
        self._fd = self._gate = None
        self.available = False


_LOCKS: dict[tuple[str, str], DeviceLock] = {}


def device_lock(device: str) -> DeviceLock:
    """The lock of the device `run.device` names (one object per device and lock folder in this process)."""
    slot = device_slot(device)
    key = (slot, str(lock_dir()))
    if key not in _LOCKS:
        _LOCKS[key] = DeviceLock(slot)
    return _LOCKS[key]


def yield_now() -> None:
    """`DeviceLock.yield_point` of every device this process computes on (for long computations that know
    no config, e.g. a calibration's rounds); a no-op outside shared sections."""
    for lock in list(_LOCKS.values()):
        lock.yield_point()


@contextlib.contextmanager
def idle():
    """`DeviceLock.idle` of every device this process holds: wrap a wait for another process's lock."""
    with contextlib.ExitStack() as stack:
        for lock in list(_LOCKS.values()):
            stack.enter_context(lock.idle())
        yield


# ---- threads and the execution context of this process ----------------------------------------------------
@dataclass
class Execution:
    """How this process runs cells: `workers` processes in the sweep (1: serial), this one's number (None
    outside a worker pool), torch threads for answering and for timing."""

    workers: int = 1
    worker: int | None = None
    threads: int | None = None
    timing_threads: int | None = None
    extra: dict = field(default_factory=dict)


_CURRENT: list[Execution] = []


def set_current(ex: Execution) -> None:
    """Make `ex` this process's execution context (a worker sets it once at start)."""
    _CURRENT[:] = [ex]


def serial_threads() -> int:
    """The intra-op threads a serial run uses here: torch's own default in this process (`OMP_NUM_THREADS`
    or the cores), read before anything changed it."""
    return _DEFAULT_THREADS[0] or usable_cores()


_DEFAULT_THREADS: list[int | None] = [None]


def remember_default_threads() -> None:
    if _DEFAULT_THREADS[0] is None:
        import torch

        _DEFAULT_THREADS[0] = torch.get_num_threads()


def worker_threads(workers: int, user_threads: int | None) -> int:
    """Answering threads of one of `workers` processes sharing this machine: `run.threads` if given, else
    an equal share of the cores (at least one, at most a serial run's count)."""
    if user_threads:
        return int(user_threads)
    return max(1, min(serial_threads(), usable_cores() // max(1, workers)))


def for_cell(cfg) -> Execution:
    """The execution context of a cell in this process, with its threads applied: a worker's own context,
    or a serial run's (torch's default threads unless `run.threads` is set)."""
    import torch

    remember_default_threads()
    user = cfg.run.get("threads")
    if _CURRENT:  # a worker of a parallel sweep; `run.threads` (given) wins over its share of the cores
        ex = _CURRENT[0]
        if user:
            ex = Execution(workers=ex.workers, worker=ex.worker, threads=int(user), timing_threads=int(user),
                           extra=ex.extra)
    else:
        t = int(user) if user else serial_threads()
        ex = Execution(workers=1, threads=t, timing_threads=t)
    if ex.threads and torch.get_num_threads() != ex.threads:
        torch.set_num_threads(ex.threads)
    return ex


@contextlib.contextmanager
def timing_threads(ex: Execution):
    """Run the timed part with the serial run's thread count (it runs alone), then go back."""
    import torch

    before = torch.get_num_threads()
    want = ex.timing_threads or before
    if want != before:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def describe(ex: Execution, lock: DeviceLock | None) -> dict:
    """The record's `execution` section."""
    out = {k: v for k, v in asdict(ex).items() if k != "extra"}
    out.update(ex.extra)
    out["device_lock"] = str(lock.path) if lock is not None and lock.available else None
    return out


def latency_note(lock: DeviceLock | None, threads: int) -> str:
    """How a cell's latency was taken, in words (the record's `efficiency.latency.taken`)."""
    if lock is not None and lock.available:
        return (f"alone: exclusive {lock.slot} lock (no other vtbench process computing on {lock.slot}), "
                f"{threads} torch thread(s)")
    return f"unlocked (no device lock available), {threads} torch thread(s)"
