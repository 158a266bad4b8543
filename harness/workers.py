"""Parallel answering: the cells of a sweep run in N worker processes (`run.workers`).

    vtbench -m method=none,random,fastv,tome run.limit=40              # run.workers=auto: one per core / GPU
    vtbench -m method=none,random run.workers=1                        # one after the other, in this process

Hydra's basic launcher goes through the sweep's jobs as usual (job numbers, `multirun/<date>/<time>/<n>/`
folders with their `.hydra` configs), but a job whose cell has no complete record is handed to an idle
worker (`WorkerPool.submit`) instead of being run in the sweep's process; the sweep waits for them all at
the end (`WorkerPool.join`). A worker is a `python -m harness.workers` process that composes the job's
overrides exactly as `vtbench` would and runs the cell with `harness.runner.run_cell`; its output goes to
the job's folder (`cell.log`), and the sweep's monitor shows the result lines. Nothing about a cell's
answers depends on the worker running it: `run.workers` is not part of the record key, and the store's
locks (`locks/<key>.lock`, `partial/<key>.jsonl`) already make concurrent writers safe.

Each worker is pinned to its share of the machine: on CPU `max(1, cores // N)` torch threads (one per
worker by default), on a machine with several CUDA GPUs one GPU (`CUDA_VISIBLE_DEVICES`, round robin).
Timing runs alone on its device (`harness.execution`).

**Fork server.** The workers' heavy imports (torch, transformers, lmms-eval, W&B, fvcore: about 6 s of one
core) are paid once per sweep, not once per worker: a fork server (`ForkServer`, `python -m harness.workers
--fork-server`) starts when the sweep starts, imports them while the sweep validates its cells (on a core
the validation leaves idle), and forks each worker on request, ready at once (a replacement too). It
computes nothing before forking (no torch thread pool, no CUDA), so a forked worker is a fresh process
with its modules loaded; it sets its own threads and device as a started one would. If the server cannot
start, workers are started as processes of their own (`python -m harness.workers`), as before.

Kill-safety: a worker dies with the sweep (a pipe whose write end only the sweep holds reads end of file when
the sweep is gone, however it ended; and Linux `PR_SET_PDEATHSIG`), so SIGKILL of the sweep leaves no process
behind and a rerun resumes every interrupted cell from its answers. A worker killed on its own fails only its cell ("the worker process died ..."; its answers are
kept) and is replaced; the sweep goes on and exits 1 naming the cell; rerunning resumes it.
"""
from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


# ---- one cell, wherever it runs -------------------------------------------------------------------------
def run_job(cfg, num) -> dict:
    """Run one cell of a sweep and say how it ended: `{"status": "complete" | "failed" | "bad_input",
    "reason", "key", "accuracy"}`. A run-time failure is recorded in the store as a failed record."""
    from harness.errors import bad_input_errors, error_line, failure_reason
    from harness.runner import efficiency_fn, run_cell, write_failed

    try:
        rec = run_cell(cfg, efficiency_fn=efficiency_fn())
    except bad_input_errors() as e:  # found only when the cell runs (e.g. its benchmark data)
        print(f"vtbench: error in cell {num}: {error_line(e)}", file=sys.stderr, flush=True)
        return {"status": "bad_input", "reason": error_line(e)}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a run-time failure (OOM, kernel error): record it, go on
        reason = failure_reason(e)
        print(f"vtbench: cell {num} failed: {reason}", file=sys.stderr, flush=True)
        traceback.print_exc(limit=3, file=sys.stderr)
        write_failed(cfg, reason)
        return {"status": "failed", "reason": reason}
    if rec.get("status") != "complete":  # e.g. every sample failed
        print(f"vtbench: cell {num} failed: {rec.get('error')}", file=sys.stderr, flush=True)
        return {"status": "failed", "reason": str(rec.get("error"))}
    return {"status": "complete", "reason": None, "key": rec["key"], "accuracy": rec.get("accuracy")}


def needs_worker(cfg) -> bool:
    """Whether a cell has work to do (no complete record, or `run.force`); a complete one is reused in the
    sweep's own process, in a fraction of a second."""
    from harness.config import resolved
    from harness.results import ResultsStore, record_key

    if cfg.run.force:
        return True
    try:
        return not ResultsStore(cfg.store.dir).is_complete(record_key(resolved(cfg)))
    except Exception:  # whatever is wrong, the worker's run_cell names it
        return True


# ---- how many workers, pinned to what --------------------------------------------------------------------
@dataclass
class Plan:
    """How a sweep runs its cells: `workers` processes (1: in the sweep's own process), `threads` torch
    threads each for answering and `timing_threads` for timing, CUDA devices to pin them to (round robin)."""

    workers: int = 1
    threads: int | None = None
    timing_threads: int | None = None
    gpus: list[str] = field(default_factory=list)
    device: str = "cpu"

    def describe(self) -> str:
        where = (f"one CUDA GPU each (round robin over {','.join(self.gpus)})" if self.gpus
                 else f"{self.threads} torch thread(s) each")
        return (f"answering in {self.workers} worker processes, {where}; latency, memory and throughput "
                f"are timed alone on the device ({self.timing_threads} thread(s))")


def _auto_workers(device: str) -> tuple[int, list[str]]:
    """`run.workers=auto`: one worker per CUDA GPU (pinned) for `cuda`/`auto` on a GPU machine, one for a
    named GPU (`cuda:N`) or `mps`, one single-threaded worker per usable core on CPU."""
    from harness.execution import usable_cores

    gpus = _gpus(device)
    if gpus:
        return len(gpus), gpus
    if device.startswith("cuda") or device == "mps":
        return 1, []
    return usable_cores(), []


def _gpus(device: str) -> list[str]:
    """The CUDA devices workers are spread over: all visible ones for `run.device=cuda` or `auto` (none for
    a named `cuda:N`, which every worker shares)."""
    if device not in ("cuda", "auto"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    n = torch.cuda.device_count()
    return visible[:n] if visible else [str(i) for i in range(n)]


def plan(combos: list[list[str]], todo: int, cfgs: list | None = None) -> Plan:
    """The plan of a sweep from its cells' configs (all composed before; `cfgs`: already composed, in the
    order of `combos`): `run.workers` must be the same in every cell (it says how the sweep runs, not what
    a cell is); at most one worker per cell to do."""
    from omegaconf import OmegaConf

    from harness.config import ConfigError, compose_config
    from harness.execution import remember_default_threads, serial_threads, worker_threads

    values, devices, threads = [], [], []
    for i, combo in enumerate(combos):
        cfg = cfgs[i] if cfgs is not None else compose_config(combo)
        values.append(OmegaConf.select(cfg, "run.workers", default="auto"))
        devices.append(str(cfg.run.device))
        threads.append(OmegaConf.select(cfg, "run.threads", default=None))
    distinct = list(dict.fromkeys(str(v) for v in values))
    if len(distinct) > 1:
        raise ConfigError(f"run.workers={','.join(distinct)}: run.workers cannot vary within a sweep "
                          "(it says how the sweep runs, not what a cell is)")
    device = devices[0] if devices else "cpu"
    value = values[0] if values else 1
    if value == "auto":
        n, gpus = _auto_workers(device)
    else:
        n, gpus = int(value), (_gpus(device) if len(set(devices)) == 1 else [])
    n = max(1, min(n, todo))
    remember_default_threads()
    user = threads[0] if len(set(map(str, threads))) == 1 else None
    t = worker_threads(n, user) if n > 1 else (user or serial_threads())
    return Plan(workers=n, threads=t, timing_threads=int(user) if user else serial_threads(),
                gpus=gpus if n > 1 else [], device=device)


# ---- the fork server --------------------------------------------------------------------------------------
#: what a worker imports before its first cell (the fork server imports them once for every worker), vtbench's
#: own modules a cell imports on first use included
PRELOAD = ("torch", "harness.execution", "harness.runner", "harness.efficiency.probe", "lmms_eval.evaluator",
           "harness.config", "harness.benchmarks.prepare", "harness.benchmarks.shapes_task", "harness.budget",
           "harness.calibration", "harness.environment", "harness.models.loading", "harness.models.checkpoint",
           "harness.recall", "harness.wandb_log", "methods")
#: imported too when installed (a first cell imports them otherwise, about 3 s of one core): W&B's run and API
#: modules, fvcore, the LLaVA / CLIP / Llama classes and processors, lmms-eval's generation metrics
PRELOAD_OPTIONAL = ("wandb", "wandb.apis.public", "wandb.sdk.launch", "fvcore.nn",
                    "transformers.models.llava.modeling_llava", "transformers.models.llava.processing_llava",
                    "transformers.models.clip.modeling_clip", "transformers.models.clip.image_processing_pil_clip",
                    "transformers.models.llama.modeling_llama", "lmms_eval.models.model_utils.gen_metrics")
WORKER_NAME, SERVER_NAME = b"vtbench-worker", b"vtbench-forksrv"


def fork_server_wanted(overrides: list[str]) -> bool:
    """Whether a sweep should start its fork server before validating (it may need workers): not when the
    user asked for one process (`run.workers=1` / `VTBENCH_WORKERS=1`) or the machine has one core and no GPU
    (a plan of one worker); the sweep stops an unneeded server."""
    from harness.execution import usable_cores

    given = [o.partition("=")[2].strip() for o in overrides if o.lstrip("+~").startswith("run.workers=")]
    value = given[-1] if given else os.environ.get("VTBENCH_WORKERS", "auto")
    value = value.strip().strip("'\"")
    if value != "auto" and not (value.isdigit() and int(value) > 1):
        return False  # one worker, or a bad value the validation refuses in one line
    if "--next" not in overrides and not any("," in o or o.lstrip("+~").startswith(("experiment=", "hydra."))
                                             for o in overrides):
        return False  # one cell (no swept value, no experiment's table): it runs in the sweep's process
    return usable_cores() > 1 or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip(" -1"))


class ForkServer:
    """The sweep's side of the fork server: a control socket (one packet per message; file descriptors
    travel with the spawn requests) and the server's messages -- `ready`, `spawned` (request -> pid), `exit`
    (pid -> exit code, negative for a signal, as `subprocess` gives it)."""

    def __init__(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.output = tempfile.TemporaryFile()  # its own output: an import error, shown if it cannot start
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.workers", "--fork-server", str(theirs.fileno()),
                 "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=self.output, stderr=self.output, env=env,
                pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            theirs.close()
        self.ready = self.failed = False
        self.spawned: dict[int, int] = {}  # request number -> pid
        self.exits: dict[int, int] = {}  # pid -> exit code
        self._requests = 0

    def spawn(self, fds: list[int], **args) -> int:
        """Ask for a worker with `fds` (task input, result output, sweep-alive pipe, log) and `args`; returns
        the request number (its pid follows in a `spawned` message)."""
        n = self._requests
        self._requests += 1
        socket.send_fds(self.sock, [json.dumps({"spawn": n, **args}).encode()], fds)
        return n

    def drain(self, timeout: float | None = 0) -> None:
        """Read the server's messages: wait up to `timeout` for the first, then every one already there."""
        while not self.failed:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return
            timeout = 0
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # the server is gone; the workers it forked died with it (their death signal)
                self.failed = True
                return
            msg = json.loads(data)
            if msg.get("ready"):
                self.ready = True
            elif "spawned" in msg:
                self.spawned[int(msg["spawned"])] = int(msg["pid"])
            elif "exit" in msg:
                self.exits[int(msg["exit"])] = int(msg["code"])

    def why_not(self) -> str:
        """The last line of the server's output (why it stopped)."""
        try:
            self.output.seek(0)
            lines = [ln for ln in self.output.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1].strip() if lines else f"exit code {self.proc.poll()}"

    def close(self) -> None:
        """Stop the server now (its workers must be gone first: they die with it). Killed, not waited for: it
        holds nothing, and one still importing (a sweep refused for bad input) would keep the sweep waiting."""
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.output.close()


class _Forked:
    """A worker forked by the fork server, with the part of `subprocess.Popen`'s interface the pool uses."""

    def __init__(self, server: ForkServer, request: int, stdin):
        self.server, self.request, self.stdin = server, request, stdin
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self.server.spawned.get(self.request)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.drain(0)
            pid = self.pid
            if pid is not None and pid in self.server.exits:
                self.returncode = self.server.exits[pid]
            elif self.server.failed:  # forked or not, it cannot outlive the server (death signal)
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("vtbench worker", timeout)
            self.server.drain(0.2 if left is None else min(0.2, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        deadline = time.monotonic() + 10
        while self.pid is None and self.poll() is None and time.monotonic() < deadline:  # not forked yet
            self.server.drain(0.1)
        if self.pid is not None and self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---- the pool, in the sweep's process -------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    fd: int
    log: Path
    buf: bytes = b""
    ready: bool = False
    task: dict | None = None


class WorkerPool:
    """N worker processes fed one cell at a time. Every method runs in the sweep's main thread (the
    workers' death signal is tied to the thread that starts them)."""

    def __init__(self, plan: Plan, log_dir: Path | None = None, out=None, server: ForkServer | None = None):
        self.plan = plan
        #: the fork server that starts the workers (None: each worker a process of its own)
        self.server = server
        #: the worker logs' folder (the sweep's Hydra folder, known once the first job runs)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.out = out or sys.stderr
        self.workers: list[_Worker] = []
        self.reasons: dict[str, str] = {}  # why a cell has no record, by record key
        self.sel = selectors.DefaultSelector()
        self.broken = False  # a worker died before it could take a cell (a broken environment: its log says why)
        self._alive: tuple[int, int] | None = None
        self.queue: list[dict] = []  # cells not handed out yet
        self.calibrating: set[str] = set()  # calibrations a worker's cell is computing (first use)
        self.calibrated: set[str] = set()  # ... and those whose first cell has finished

    # workers ----------------------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> _Worker:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.plan.threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.plan.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.plan.gpus[slot % len(self.plan.gpus)]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"worker-{slot}.log"
        if self._alive is None:  # the workers' "sweep alive" pipe: only this process holds the write end
            self._alive = os.pipe()
        if self.server is not None:
            worker = self._fork(slot, env, log)
            if worker is not None:
                return worker
        r, w = os.pipe()
        alive = self._alive[0]
        try:
            with open(log, "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "harness.workers", "--result-fd", str(w), "--alive-fd", str(alive),
                     "--parent", str(os.getpid()), "--workers", str(self.plan.workers), "--index", str(slot),
                     "--threads", str(self.plan.threads), "--timing-threads", str(self.plan.timing_threads)],
                    stdin=subprocess.PIPE, stdout=logf, stderr=logf, env=env, pass_fds=(w, alive), close_fds=True)
        finally:
            os.close(w)
        worker = _Worker(index=slot, proc=proc, fd=r, log=log)
        self.sel.register(r, selectors.EVENT_READ, worker)
        self.workers.append(worker)
        return worker

    def _fork(self, slot: int, env: dict, log: Path) -> _Worker | None:
        """A worker forked by the fork server; None (and the server stopped) if the server cannot start one."""
        server = self.server
        server.drain(0)
        if server.failed:
            print(f"vtbench: the workers' fork server stopped ({server.why_not()}); starting each worker as a "
                  "process of its own", file=self.out, flush=True)
            server.close()
            self.server = None
            return None
        task_r, task_w = os.pipe()
        r, w = os.pipe()
        logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            request = server.spawn(
                [task_r, w, self._alive[0], logfd], index=slot, workers=self.plan.workers,
                threads=self.plan.threads, timing_threads=self.plan.timing_threads,
                env={k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in env})
        except OSError:  # the server is gone
            server.failed, request = True, None
        finally:
            for fd in (task_r, w, logfd):  # the worker's ends: only the worker holds them (the server closes its copies)
                os.close(fd)
        if request is None:
            os.close(task_w)
            os.close(r)
            return self._fork(slot, env, log)  # says so and stops the server; the caller starts a process
        worker = _Worker(index=slot, proc=_Forked(server, request, os.fdopen(task_w, "wb")), fd=r, log=log)
        self.sel.register(r, selectors.EVENT_READ, worker)
        self.workers.append(worker)
        return worker

    def _idle(self, spawn_only: bool = False) -> _Worker | None:
        """A worker without a cell; a new one (in a free slot) while fewer than planned are alive and none
        has failed to start. `spawn_only`: only a new one (started, not yet given a cell)."""
        w = None if spawn_only else next((w for w in self.workers if w.task is None), None)
        if w is None and len(self.workers) < self.plan.workers and not self.broken:
            used = {x.index for x in self.workers}
            w = self._spawn(min(set(range(self.plan.workers)) - used))
        return w

    # cells ------------------------------------------------------------------------------------------------
    def submit(self, task: dict) -> None:
        """Queue a cell (the workers start now; an idle one takes it at once, `join` hands out the rest). `task`: overrides,
        key (the record key), calibration (what its first-use calibration is keyed by, or None), num, total,
        label, log (the cell's log file), group (the W&B group)."""
        self.queue.append(task)
        while self._idle(spawn_only=True) is not None:  # start the workers while Hydra goes through the jobs
            pass
        self.pump()

    def pump(self) -> None:
        """Without waiting: read what finished, then hand queued cells to workers without one (the first cells
        run while Hydra still goes through the sweep's jobs; `join` waits for the rest)."""
        self._collect(timeout=0)
        while self.queue:
            w = next((w for w in self.workers if w.task is None), None)
            task = self._next() if w is not None else None
            if task is None:
                return
            self._dispatch(w, task)

    def _next(self) -> dict | None:
        """The next cell to hand out: first a cell that computes a calibration nobody computes yet (the long
        ones start early), then cells that need none or find theirs done, in the sweep's order; a cell whose
        calibration another worker is computing waits until it is done (it would only wait for it), unless
        nothing else is left."""
        def rank(t):
            cal = t.get("calibration")
            if cal is None or cal in self.calibrated:
                return 1
            return 2 if cal in self.calibrating else 0

        if not self.queue:
            return None
        best = min(range(len(self.queue)), key=lambda i: (rank(self.queue[i]), i))
        if rank(self.queue[best]) == 2 and any(w.task is not None for w in self.workers):
            return None  # wait for the calibrating cell to finish (or for other cells)
        return self.queue.pop(best)

    def join(self) -> None:
        """Hand out every queued cell to idle workers, wait for them all, then let the workers go."""
        while self.queue or any(w.task is not None for w in self.workers):
            w = self._idle() if self.queue else None
            if w is None and self.queue and not self.workers:  # no worker could start: the cells cannot run here
                for task in self.queue:
                    self._fail(task, f"no worker process could start (see the worker logs under {self.log_dir})")
                self.queue.clear()
                continue
            task = self._next() if w is not None else None
            if task is None:
                self._collect(timeout=None)
                continue
            self._dispatch(w, task)
        self.close()

    def _dispatch(self, w: _Worker, task: dict) -> None:
        w.task = task
        if task.get("calibration") is not None and task["calibration"] not in self.calibrated:
            self.calibrating.add(task["calibration"])
        print(f"[vtbench] ===== cell {task['num']}/{task['total']}: {task['label']} → worker {w.index} "
              f"(log: {task['log']}) =====", file=self.out, flush=True)
        try:
            w.proc.stdin.write((json.dumps(task) + "\n").encode())
            w.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died meanwhile: its death is collected next
            pass

    def _finished(self, task: dict) -> None:
        cal = task.get("calibration")
        if cal is not None:
            self.calibrating.discard(cal)
            self.calibrated.add(cal)

    def close(self) -> None:
        for w in list(self.workers):
            try:
                w.proc.stdin.close()  # an idle worker ends on its closed input
            except OSError:
                pass
        deadline = time.monotonic() + 30
        for w in list(self.workers):
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            self._forget(w)
        self._stop_server()

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def terminate(self) -> None:
        """Stop every worker now (the sweep was interrupted): SIGTERM, then SIGKILL after 10 s. Their answers
        so far are on disk; the same command resumes."""
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for w in list(self.workers):
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            self._forget(w)
        self._stop_server()

    def _close_alive(self) -> None:
        if self._alive is not None and not self.workers:
            for fd in self._alive:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._alive = None

    def _forget(self, w: _Worker) -> None:
        try:
            self.sel.unregister(w.fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(w.fd)
        except OSError:
            pass
        if w in self.workers:
            self.workers.remove(w)
        self._close_alive()

    def _collect(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            w: _Worker = key.data
            try:
                data = os.read(w.fd, 65536)
            except OSError:
                data = b""
            if not data:
                self._died(w)
                continue
            w.buf += data
            while b"\n" in w.buf:
                line, w.buf = w.buf.split(b"\n", 1)
                self._message(w, json.loads(line))

    def _message(self, w: _Worker, msg: dict) -> None:
        if msg.get("ready"):
            w.ready = True
            return
        task, w.task = w.task, None
        if task is None:
            return
        self._finished(task)
        status, reason = msg.get("status"), msg.get("reason")
        if status == "bad_input":
            print(f"vtbench: error in cell {task['num']}: {reason}", file=self.out, flush=True)
            self.reasons[task["key"]] = reason
        elif status != "complete":
            print(f"vtbench: cell {task['num']} failed: {reason} (log: {task['log']})", file=self.out, flush=True)

    def _died(self, w: _Worker) -> None:
        code = w.proc.wait()
        task = w.task
        self._forget(w)
        how = f"exit code {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        if task is not None:
            self._finished(task)
            reason = (f"its worker process died ({how}); the answers it produced are kept: rerun the same command "
                      "to resume the cell")
            self._fail(task, reason)
        if not w.ready and code > 0:  # it could not start (a broken environment): a replacement would fail too
            self.broken = True
            print(f"vtbench: a worker process could not start ({how}; log: {w.log})", file=self.out, flush=True)
        # otherwise the next cell starts a replacement in its slot (`_idle`)

    def _fail(self, task: dict, reason: str) -> None:
        self.reasons[task["key"]] = reason
        print(f"vtbench: cell {task['num']} failed: {reason} (log: {task['log']})", file=self.out, flush=True)


# ---- the worker process ----------------------------------------------------------------------------------
def _die_with_parent(parent: int, alive_fd: int) -> None:
    """End this process (SIGKILL, as the sweep itself may have been killed) as soon as the sweep is gone, however
    it ended: `alive_fd` is the read end of a pipe whose only write end the sweep holds, so it reads end of
    file exactly when the sweep's process is gone (a watcher thread); and on Linux the kernel's
    `PR_SET_PDEATHSIG` too (some sandboxes ignore it)."""
    import threading

    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # not Linux: the watcher below does it

    def watch():
        while True:
            try:
                if not os.read(alive_fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="vtbench-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the sweep died before the watcher started
        os.kill(os.getpid(), signal.SIGKILL)


class _Redirect:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to a file for a while."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((1, 2), self.saved):
            os.dup2(fd, target)
            os.close(fd)


def _run_task(task: dict) -> dict:
    from omegaconf import open_dict

    from harness.config import compose_config
    from harness.execution import device_lock

    with device_lock("cpu").shared():  # composing computes on the CPU beside the other workers' timing
        cfg = compose_config(task["overrides"])
    if task.get("group") and cfg.get("logger") is not None and "group" in cfg.logger:
        with open_dict(cfg):
            cfg.logger.group = task["group"]
    print(f"[vtbench] ===== cell {task['num']}/{task['total']}: {task['label']} (worker pid {os.getpid()}) =====",
          file=sys.stderr, flush=True)
    return run_job(cfg, task["num"])


PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def _prctl(option: int, arg) -> None:
    """Linux `prctl(option, arg)` (a no-op elsewhere, or where a sandbox refuses it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except Exception:  # pragma: no cover - not Linux
        pass


def _name_process(name: bytes) -> None:
    """The process's name as `ps` / `top` show it (`PR_SET_NAME`, 15 bytes at most)."""
    import ctypes

    _prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]))


def _fork_server(control_fd: int, parent: int) -> int:
    """The fork server's loop (see the module docstring): import what every worker needs, then fork one worker
    per request and report its pid, and each worker's exit, to the sweep. Ends when the sweep closes the
    control socket or is gone; it computes nothing itself."""
    import importlib

    _name_process(SERVER_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the sweep and its workers; it stops them, then this
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # dies with the sweep (elsewhere: its closed socket ends it)
    if os.getppid() != parent:
        return 1
    sock = socket.socket(fileno=control_fd)
    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _warm_up()
    sys.stdout.flush()
    sys.stderr.flush()
    sock.send(json.dumps({"ready": True}).encode())

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass

    while True:
        ready, _, _ = select.select([sock], [], [], 0.2)
        reap()
        if not ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 8)
        except OSError:
            return 0
        if not msg:  # the sweep closed the socket (done) or is gone
            return 0
        req = json.loads(msg)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                sock.close()
                code = _forked_worker(req, fds)
            except BaseException:  # noqa: BLE001 - whatever ends it, it ends here (never back in the server's loop)
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        for fd in fds:
            os.close(fd)
        try:
            sock.send(json.dumps({"spawned": req["spawn"], "pid": pid}).encode())
        except OSError:
            return 0


def _warm_up() -> None:
    """What a first cell pays once and a forked worker can inherit, computing nothing on a device: every
    method's module (the registry) and one Hydra composition (Hydra's own modules and plugins)."""
    try:
        import methods
        from harness.config import compose_config

        methods.available()
        compose_config([])
    except Exception:  # a broken config or method is the cells' to report, in their own words
        pass


def _forked_worker(req: dict, fds: list[int]) -> int:
    task_r, result_w, alive_r, log = fds
    os.dup2(task_r, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(task_r)
    os.close(log)
    sys.stdin = open(0, "r", closefd=False)  # noqa: SIM115 - the task pipe, read line by line
    os.environ.update(req.get("env") or {})
    _name_process(WORKER_NAME)
    return _serve(result_w, alive_r, os.getppid(), int(req["workers"]), int(req["index"]), int(req["threads"]),
                  int(req["timing_threads"]), started="forked")


def main(argv: list[str] | None = None) -> int:
    import argparse

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--fork-server"]:
        ap = argparse.ArgumentParser(prog="python -m harness.workers --fork-server")
        ap.add_argument("--fork-server", type=int, required=True)
        ap.add_argument("--parent", type=int, required=True)
        a = ap.parse_args(argv)
        return _fork_server(a.fork_server, a.parent)
    ap = argparse.ArgumentParser(prog="python -m harness.workers", description="a worker of a parallel sweep")
    for name in ("--result-fd", "--alive-fd", "--parent", "--workers", "--index", "--threads", "--timing-threads"):
        ap.add_argument(name, type=int, required=True)
    a = ap.parse_args(argv)
    return _serve(a.result_fd, a.alive_fd, a.parent, a.workers, a.index, a.threads, a.timing_threads)


def _serve(result_fd: int, alive_fd: int, parent: int, workers: int, index: int, threads: int,
           timing_threads: int, started: str = "process") -> int:
    """A worker's loop: one cell per line of its input, one result line per cell on `result_fd`. `started`:
    how the worker began, stated in each record's `execution` ("forked" by the fork server, or a "process"
    of its own)."""
    _die_with_parent(parent, alive_fd)
    from harness.errors import install_signal_handlers

    install_signal_handlers()
    out = result_fd

    def send(msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(out, data):]

    try:
        import torch

        from harness.execution import Execution, remember_default_threads, set_current

        remember_default_threads()
        torch.set_num_threads(threads)
        extra = {"started": started}
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            extra["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        set_current(Execution(workers=workers, worker=index, threads=threads, timing_threads=timing_threads,
                              extra=extra))
        # the heavy imports once, while the sweep hands out the cells
        import harness.runner  # noqa: F401
        import harness.efficiency.probe  # noqa: F401
        import lmms_eval.evaluator  # noqa: F401

        send({"ready": True, "pid": os.getpid()})
        while True:
            line = sys.stdin.readline()
            if not line:  # the sweep closed our input: done (or it died)
                return 0
            task = json.loads(line)
            with _Redirect(task["log"]):
                try:
                    result = _run_task(task)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # the machinery around the cell (run_job catches the cell's own)
                    from harness.errors import failure_reason

                    traceback.print_exc(file=sys.stderr)
                    result = {"status": "failed", "reason": failure_reason(e)}
            send(result)
    except KeyboardInterrupt:  # SIGTERM / SIGINT from the sweep: the answers so far are on disk
        return 143
    finally:
        try:
            os.close(out)
        except OSError:
            pass


if __name__ == "__main__":  # pragma: no cover - started by WorkerPool
    sys.exit(main())
