"""The GPU run (`make bench-gpu`, ``--gpu-full``): full-size random architectures, one after the other
under a wall-clock budget."""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from harness.bench.core import Bench
from harness.bench.measure import CLOCK, TimeGuard, loadavg, machine_name
from harness.bench.render import bench_meta, write_report
from harness.bench.setup import ALL_METHODS, Spec, full_config


# ---- the GPU run (`make bench-gpu`, `vtbench-bench --gpu-full`) ------------------------------------------
GPU_ARCHS = ("llava15_7b", "llava_next_7b")
GPU_PARTS = ("methods", "scores", "batch")
GPU_BATCH_METHODS = ("none", "fastv")
#: the wall-clock budget of the measurements (s); interpreter start, imports, CUDA initialisation and the
#: reports come on top (about 20-40 s), and one round of a loop may end past it: the command stays under 10 min
GPU_BUDGET_S = 480
#: planned rounds (upper bounds: the time guard stops a loop early when its share of the budget is spent)
GPU_REPEATS = 20
GPU_GEN_REPEATS = 10
#: relative share of the budget per family (LLaVA-NeXT's prompt has ~5x the visual tokens, but per-call
#: Python/launch overhead dominates batch-1 decoding on a GPU, so its cost is not 5x)
GPU_ARCH_WEIGHT = {"llava": 1.0, "llava_next": 1.5}
NO_GPU_LINE = "vtbench-bench --gpu-full: no CUDA GPU on this machine; nothing run"


def gpu_spec(device: str = "cuda", dtype: str = "float16", repeats: int | None = None) -> Spec:
    """The GPU run's settings: fp16, wall clock, FLOPs counted by torch's formulas during a real forward
    (`flop_counter_mode`: one forward's time, where fvcore's trace of a 7B model takes far longer), peak
    memory recorded; `repeats` prefill rounds (generate / scores: half as many)."""
    r = repeats or GPU_REPEATS
    return Spec(repeats=r, gen_repeats=max(1, min(GPU_GEN_REPEATS, r // 2)) if repeats else GPU_GEN_REPEATS,
                device=device, dtype=dtype, threads=torch.get_num_threads(), counter="flop_counter_mode",
                memory=True)


def run_gpu_full(*, out: Path, device: str = "cuda", dtype: str = "float16", archs=GPU_ARCHS, names=None,
                 parts=GPU_PARTS, batch_names=GPU_BATCH_METHODS, repeats: int | None = None,
                 budget_s: float = GPU_BUDGET_S, machine: str | None = None,
                 command: str = "vtbench-bench --gpu-full",
                 overrides: dict | None = None, clock: Callable[[], float] = time.perf_counter,
                 log: Callable[[str], None] | None = None) -> dict:
    """Each architecture in turn (built on the device, measured, its report written, then freed): the
    `parts` of the bench under one `TimeGuard` of `budget_s`. Architecture i gets weight_i / (the weights of
    it and the ones after it) of the time left when it starts, so time one leaves unused goes to the next.
    An architecture that fails is reported (one line) and the next one still runs. `overrides`: per-arch
    Hydra overrides of the model config (the tests run scaled-down copies on CPU)."""
    names = list(names or ALL_METHODS)
    overrides = overrides or {}
    guard = TimeGuard(budget_s, clock)
    machine = machine or machine_name(device)
    log = log or (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    CLOCK[0] = time.perf_counter
    weights = [GPU_ARCH_WEIGHT.get(full_config(x, overrides.get(x, ())).model_type, 1.0) for x in archs]
    results: dict[str, Any] = {"archs": {}, "failed": []}
    fixed_prev = None  # build + counting seconds of the previous architecture
    for i, arch in enumerate(archs):
        n_events = len(guard.events)
        spec = gpu_spec(device, dtype, repeats)
        if fixed_prev is not None and not guard.allows(f"{arch} (model build and FLOP counting)", 2 * fixed_prev):
            # the report still says what happened (a stub: no parts)
            res = {"meta": bench_meta(spec, f"{machine}-{arch}", command, "wall", arch)}
            res["meta"].update(make="make bench-gpu", note=f"NOT RUN: {guard.events[-1]}.",
                               time_guard={"budget_s": guard.budget_s, "share_s": 0.0, "events": guard.events[n_events:]})
            res["paths"] = write_report(res, Path(out) / res["meta"]["machine"])
            results["archs"][arch] = res
            log(guard.events[-1])
            continue
        ag = guard.child(weights[i] / sum(weights[i:]))
        bench = Bench(spec, log=log, arch=arch)
        bench.guard = ag
        bench.overrides = tuple(overrides.get(arch, ()))
        bench.tolerate_failures = True
        t0 = time.perf_counter()
        res: dict[str, Any] = {"meta": bench_meta(spec, f"{machine}-{arch}", command, "wall", arch)}
        res["meta"]["note"] = ("Full-size architecture with RANDOM weights (speed, memory and FLOPs are the real "
                               "model's; answers mean nothing).")
        res["meta"]["make"] = "make bench-gpu"
        errors: list[str] = []
        failed = object()

        def attempt(what: str, fn):
            """fn()'s result, or `failed`: a failing step (e.g. out of GPU memory in `scores`) is reported
            and the next step still runs."""
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - reported in the report, the log and the exit code
                line = f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                errors.append(line)
                results["failed"].append(f"{arch}: {line}")
                log(f"{arch}: failed: {line}")
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                return failed

        log(f"{arch}: building (share of the time budget: {ag.budget_s:.0f} s)")
        t_build = time.perf_counter()
        if attempt("model build", lambda: bench.base) is not failed:
            fixed_prev = time.perf_counter() - t_build
            t_pre = t_gen = 0.0
            if "methods" in parts and (mm := attempt("methods", lambda: bench.methods(names))) is not failed:
                res["methods"] = mm
                fixed_prev += sum(r["count_seconds"] for r in mm["rows"])
                results["failed"] += [f"{arch}: {n}: {e}" for n, e in mm["failed"].items()]
                t_pre, t_gen = mm["rows"][0]["prefill_s"], mm["rows"][0]["generate_s"]  # method none
            # estimates from `none`'s times: ~48 prefills (2 methods x 4 variants x warm-up + rounds, eager
            # slower); batch-1 + batched generation of `batch_new_tokens` per method
            if "scores" in parts and ag.allows(f"{arch}: scores", 48 * t_pre):
                if (sc := attempt("scores", bench.scores)) is not failed:
                    res["scores"] = sc
            if "batch" in parts and ag.allows(
                    f"{arch}: batch", 1.5 * len(batch_names) * (spec.batch + 1) * t_gen
                    * spec.batch_new_tokens / spec.gen_tokens):
                if (bt := attempt("batch", lambda: bench.batch(batch_names))) is not failed:
                    res["batch"] = bt
        if errors:
            res["meta"]["error"] = "; ".join(errors)
            res["meta"]["note"] += " FAILED: " + "; ".join(errors)
        res["meta"]["time_guard"] = {"budget_s": guard.budget_s, "share_s": ag.budget_s,
                                     "events": guard.events[n_events:]}
        res["meta"]["loadavg_end"] = loadavg()
        res["meta"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        res["paths"] = write_report(res, Path(out) / res["meta"]["machine"])
        log(f"{arch}: wrote {res['paths']['md']} ({res['meta']['wall_seconds']}s)")
        results["archs"][arch] = res
        del bench
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    results["events"] = list(guard.events)
    results["wall_seconds"] = round(budget_s - guard.remaining(), 1)
    return results
