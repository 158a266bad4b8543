"""What a user sees of a running sweep, whatever the launcher: a progress line with a bar and an ETA, one
result line per finished cell, and the comparison table at the end.

The monitor watches the results store (a thread polling the records of the sweep's cell keys once a
second), so the same lines reach the terminal when cells run in this process (Hydra's basic launcher) and
when they run in other processes or on other machines (`submitit_local`, `submitit_slurm`), whose own
output goes to their log files. Cells complete before the sweep started are counted as reused and left
out of the ETA (which is the mean time of the cells evaluated so far times the cells left).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def bar(done: int, total: int, width: int = 24) -> str:
    n = int(round(width * done / total)) if total else width
    return "[" + "#" * n + "." * (width - n) + "]"


def result_line(rec: dict, label: str) -> str:
    """One line of a finished cell: its overrides, accuracy, counted prefill FLOPs, prefill latency."""
    if rec.get("status") != "complete":
        return f"{label}: FAILED: {rec.get('error')}"
    eff = rec.get("efficiency") or {}
    parts = [f"{rec.get('primary_metric') or 'accuracy'}={rec['accuracy']:.4f}" if rec.get("accuracy") is not None
             else "accuracy=n/a", f"n={rec.get('n_samples')}"]
    flops = ((eff.get("flops") or {}).get("prefill") or {}).get("total")
    if flops is not None:
        parts.append(f"prefill {flops / 1e9:.4g} GFLOPs")
    vis = eff.get("visual_tokens_to_llm", eff.get("visual_tokens_llm"))
    if vis is not None:
        parts.append(f"{vis:.0f} visual tokens→LLM")
    lat = ((eff.get("latency") or {}).get("prefill_ms") or {})
    if lat.get("median") is not None:
        parts.append(f"TTFT {lat['median']:.1f} ms")
    t = (rec.get("timing") or {}).get("cell_seconds")
    if t is not None:
        parts.append(f"{t:.1f} s")
    return f"{label}: " + ", ".join(parts)


class SweepMonitor:
    def __init__(self, cells: list[tuple[str, Path, str]], interval: float = 1.0, out=None):
        """`cells`: (label, record path, key) of every cell of the sweep."""
        self.cells = cells
        self.interval = interval
        self.out = out or sys.stderr
        self.seen = {key: self._stamp(path) for _, path, key in cells}
        self.reused = sum(self._complete(p) for _, p, _ in cells)
        self.finished: dict[str, dict] = {}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _stamp(path: Path):
        try:
            st = path.stat()
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    @staticmethod
    def _read(path: Path) -> dict | None:
        from harness.schema import SchemaError, loads_strict, validate_record

        try:
            return validate_record(loads_strict(path.read_bytes()), path.stem)
        except (OSError, SchemaError, ValueError):
            return None

    def _complete(self, path: Path) -> bool:
        rec = self._read(path) if path.exists() else None
        return bool(rec) and rec.get("status") == "complete"

    def start(self) -> "SweepMonitor":
        n = len(self.cells)
        msg = f"[vtbench] sweep of {n} cells" + (f" ({self.reused} already complete: reused)" if self.reused else "")
        print(msg, file=self.out, flush=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        for label, path, key in self.cells:
            stamp = self._stamp(path)
            if stamp is None or stamp == self.seen[key]:
                continue
            rec = self._read(path)
            if rec is None:
                continue  # being replaced: next poll
            self.seen[key] = stamp
            self.finished[key] = rec
            print(f"[vtbench] {result_line(rec, label)}", file=self.out, flush=True)
            print(f"[vtbench] {self.progress()}", file=self.out, flush=True)

    def progress(self) -> str:
        n = len(self.cells)
        evaluated = len(self.finished)
        failed = sum(r.get("status") != "complete" for r in self.finished.values())
        done = min(n, self.reused + evaluated)
        elapsed = time.monotonic() - self.t0
        left = n - done
        eta = f"ETA {_hms(elapsed / evaluated * left)}" if evaluated and left else ("done" if not left else "ETA ?")
        return (f"{bar(done, n)} {done}/{n} cells · {evaluated} evaluated, {self.reused} reused, {failed} failed · "
                f"elapsed {_hms(elapsed)} · {eta}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._poll()
            except Exception:  # the monitor never breaks a sweep
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._poll()
        except Exception:
            pass

    def summary(self, out=None) -> None:
        """The comparison table of the sweep's cells (rich), with accuracy, FLOPs, latency and status."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title="vtbench sweep", show_lines=False)
        for col, just in (("cell", "left"), ("status", "left"), ("accuracy", "right"), ("prefill GFLOPs", "right"),
                          ("visual→LLM", "right"), ("TTFT ms", "right"), ("key", "left")):
            table.add_column(col, justify=just)
        for label, path, key in self.cells:
            rec = self._read(path) if path.exists() else None
            if rec is None:
                table.add_row(label, "missing", "-", "-", "-", "-", key)
                continue
            eff = rec.get("efficiency") or {}
            flops = ((eff.get("flops") or {}).get("prefill") or {}).get("total")
            vis = eff.get("visual_tokens_to_llm", eff.get("visual_tokens_llm"))
            lat = ((eff.get("latency") or {}).get("prefill_ms") or {}).get("median")
            acc = rec.get("accuracy")
            table.add_row(label, rec.get("status", "?"), "-" if acc is None else f"{acc:.4f}",
                          "-" if flops is None else f"{flops / 1e9:.4g}", "-" if vis is None else f"{vis:.0f}",
                          "-" if lat is None else f"{lat:.1f}", key)
        Console(file=out or sys.stdout, width=200, highlight=False, soft_wrap=False).print(table)
