"""The ``sweep`` part: one small sweep answered serially (`run.workers=1`) and by parallel workers
(`run.workers=auto`: one single-threaded worker per core, one per GPU; `harness.workers`), each a `vtbench -m`
subprocess on a fresh store and a fresh FLOPs cache. It shows what parallel answering buys (cells per minute,
wall time of the whole command) and that the latency a cell records does not depend on it: the parallel run's
median time to first token and decode time per token of each cell against the serial run's interquartile
range for the same cell (the timing part of each cell runs alone on the device, `harness.execution`). Answers
are compared too (they must be identical)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the cells of the part: the reference and three token methods at their default parameters
SWEEP_METHODS = ("none", "random", "fastv", "tome")


class SweepPart:
    """The sweep part of `Bench` (a mixin; `self.spec`, `self.log`)."""

    def _sweep_cmd(self) -> list[str]:
        exe = Path(sys.executable).with_name("vtbench")
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]

    def _sweep_run(self, root: Path, args: list[str], workers) -> dict:
        env = dict(os.environ, VTBENCH_CACHE=str(root / "cache"), VTBENCH_OUTPUTS=str(root / "outputs"),
                   WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
        env.pop("VTBENCH_WORKERS", None)
        store = root / "store"
        cmd = self._sweep_cmd() + args + [f"store.dir={store}", f"run.workers={workers}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            tail = " | ".join(p.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"sweep part: `vtbench -m ... run.workers={workers}` exited {p.returncode}: {tail}")
        recs = [json.loads(f.read_text()) for f in sorted((store / "records").glob("*.json"))]
        ex = recs[0].get("execution") or {} if recs else {}
        return {"wall_s": round(wall, 2), "cells": len(recs), "cells_per_min": round(60 * len(recs) / wall, 3),
                "workers": ex.get("workers"), "threads": ex.get("threads"),
                "timing_threads": ex.get("timing_threads"),
                "cell_seconds": round(sum((r.get("timing") or {}).get("cell_seconds") or 0 for r in recs), 2),
                "records": {r["key"]: r for r in recs}}

    def sweep(self, methods=SWEEP_METHODS, workers="auto") -> dict:
        """Serial vs parallel on the same cells (see the module docstring)."""
        from harness.benchmarks.prepare import prepare_shapes
        from harness.config import compose_config

        spec = self.spec
        limit, probe, repeats = (8, 2, 2) if spec.quick else (100, 4, 3)  # 100 answers: cells, not start-up, dominate
        args = ["-m", f"method={','.join(methods)}", "model=tiny", "benchmark=shapes", f"run.limit={limit}",
                "run.batch_size=8", f"run.device={spec.device}", f"run.threads={spec.threads}", "logger=none",
                f"run.efficiency.probe_size={probe}", f"run.efficiency.repeats={repeats}"]
        prepare_shapes(compose_config([]).data_dir)  # the data once, outside both timings
        # the imports once from disk, so that neither run pays a cold page cache alone
        subprocess.run([sys.executable, "-c", "import harness.runner, lmms_eval.evaluator"], capture_output=True)
        runs = {}
        with tempfile.TemporaryDirectory(prefix="vtbench-bench-sweep-") as tmp:
            # serial, parallel, serial again: the second serial run measures the machine's own noise
            for name, w in (("serial", 1), ("parallel", workers), ("serial_again", 1)):
                self.log(f"sweep part: {len(methods)} cells, run.workers={w} ...")
                runs[name] = self._sweep_run(Path(tmp) / name, args, w)
                self.log(f"sweep part: {name}: {runs[name]['wall_s']:.1f} s, {runs[name]['workers']} worker(s)")
        return compare_sweeps(runs["serial"], runs["parallel"], " ".join(["vtbench", *args]), runs["serial_again"])


def _spread(rec: dict, name: str) -> dict:
    s = ((rec.get("efficiency") or {}).get("latency") or {}).get(name) or {}
    return {k: s.get(k) for k in ("median", "q1", "q3", "n")}


def compare_sweeps(serial: dict, parallel: dict, command: str = "", serial_again: dict | None = None) -> dict:
    """Per cell: the parallel run's latency medians against the serial run's interquartile range, equal
    answers; per run: wall time, cells per minute; the gain. `serial_again`: the serial run repeated, whose
    medians against the first serial run's range are the noise baseline (how often the same serial run lands
    inside its own earlier range on this machine)."""
    rows = []
    for key, s in serial["records"].items():
        p = parallel["records"].get(key)
        if p is None:
            continue
        row = {"key": key, "method": s["cell"]["method"]["name"], "accuracy": s.get("accuracy"),
               "same_answers": [x["prediction"] for x in s["samples"]] == [x["prediction"] for x in p["samples"]],
               "same_flops": ((s.get("efficiency") or {}).get("flops") == (p.get("efficiency") or {}).get("flops")),
               "taken": ((p.get("efficiency") or {}).get("latency") or {}).get("taken")}
        again = (serial_again or {}).get("records", {}).get(key)
        for name in ("prefill_ms", "decode_ms_per_token"):
            a, b = _spread(s, name), _spread(p, name)
            row[name] = {"serial": a, "parallel": b, "within_iqr": _within(a, b)}
            if again is not None:
                c = _spread(again, name)
                row[name].update(serial_again=c, again_within_iqr=_within(a, c))
        rows.append(row)
    strip = ("records",)
    out = {"command": command, "rows": rows,
           "serial": {k: v for k, v in serial.items() if k not in strip},
           "parallel": {k: v for k, v in parallel.items() if k not in strip},
           "gain": round(parallel["cells_per_min"] / serial["cells_per_min"], 3) if serial["cells_per_min"] else None,
           "within_iqr": sum(bool(r["prefill_ms"]["within_iqr"]) for r in rows),
           "decode_within_iqr": sum(bool(r["decode_ms_per_token"]["within_iqr"]) for r in rows)}
    if serial_again is not None:
        out["serial_again"] = {k: v for k, v in serial_again.items() if k not in strip}
        out["again_within_iqr"] = sum(bool(r["prefill_ms"].get("again_within_iqr")) for r in rows)
        out["again_decode_within_iqr"] = sum(bool(r["decode_ms_per_token"].get("again_within_iqr")) for r in rows)
    return out


def _within(ref: dict, other: dict) -> bool | None:
    """Whether `other`'s median lies inside `ref`'s interquartile range (None if either is missing)."""
    if None in (ref["q1"], ref["q3"], other["median"]):
        return None
    return ref["q1"] <= other["median"] <= ref["q3"]


def _ms(s: dict) -> str:
    if s.get("median") is None:
        return "-"
    q = f" ({s['q1']:.1f}-{s['q3']:.1f})" if s.get("q1") is not None else ""
    return f"{s['median']:.1f}{q}"


def render_sweep(sw: dict) -> list[str]:
    """The report's section of the sweep part."""
    s, p = sw["serial"], sw["parallel"]
    n = len(sw["rows"])
    yes = {True: "yes", False: "**NO**", None: "-"}
    L = ["## Parallel sweep: serial vs worker processes", "",
         f"`{sw['command']}`, run twice as `vtbench -m` subprocesses, each on a fresh store and FLOPs cache: "
         f"`run.workers=1` (serial, then) and `run.workers={p.get('workers')}` (auto here). Throughput = cells / wall "
         "time of the whole command (start, validation of every cell, the workers' start included); latency = each "
         "record's efficiency probe (median and quartiles over every timed repeat of every probe document), taken "
         "alone on the device in both runs (`efficiency.latency.taken`). The parallel median should lie inside "
         "the serial run's interquartile range for the same cell.", "",
         "| run | workers | threads answering / timing | wall s | cells | cells per minute | sum of cell s |",
         "|---|---|---|---|---|---|---|"]
    for name, r in (("serial", s), ("parallel", p), ("serial again", sw.get("serial_again"))):
        if r is None:
            continue
        L.append(f"| {name} | {r.get('workers')} | {r.get('threads')} / {r.get('timing_threads')} | {r['wall_s']:.1f} | "
                 f"{r['cells']} | {r['cells_per_min']:.2f} | {r['cell_seconds']:.1f} |")
    L += ["", f"Throughput gain (cells per minute, parallel / serial): **{sw['gain']:.2f}x**.", "",
          "| cell | accuracy | same answers | same FLOPs | TTFT ms serial median (q1-q3) | TTFT ms parallel | "
          "within | decode ms/token serial median (q1-q3) | decode parallel | within |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sw["rows"]:
        a, d = r["prefill_ms"], r["decode_ms_per_token"]
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        L.append(f"| {r['method']} | {acc} | {yes[r['same_answers']]} | {yes[r['same_flops']]} | {_ms(a['serial'])} | "
                 f"{_ms(a['parallel'])} | {yes[a['within_iqr']]} | {_ms(d['serial'])} | {_ms(d['parallel'])} | "
                 f"{yes[d['within_iqr']]} |")
    L += ["", f"Parallel TTFT medians inside the serial interquartile range: **{sw['within_iqr']} of {n}** cells "
          f"(decode per token: {sw['decode_within_iqr']} of {n}). A quartile range of 3-12 timings is narrow: on a "
          "shared machine, a cell timed while another job ran lands outside it in either run."]
    if "serial_again" in sw:
        L += ["", f"The noise baseline: the same serial run repeated after the parallel one lands inside the first "
              f"serial run's range for **{sw['again_within_iqr']} of {n}** cells (decode per token: "
              f"{sw['again_decode_within_iqr']} of {n}); the parallel run can only be held to what a serial rerun "
              "achieves on the same machine.", "",
              "| cell | TTFT ms serial | serial again | within | parallel | within |", "|---|---|---|---|---|---|"]
        for r in sw["rows"]:
            a = r["prefill_ms"]
            if "serial_again" in a:
                L.append(f"| {r['method']} | {_ms(a['serial'])} | {_ms(a['serial_again'])} | "
                         f"{yes[a['again_within_iqr']]} | {_ms(a['parallel'])} | {yes[a['within_iqr']]} |")
    L.append("")
    return L
