"""Measurement helpers: interleaved timing, the time guard, robust statistics, machine facts, peak
memory, per-component / own-work times and operator profiles of a prefill."""
from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::einsum")
ATTN_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::softmax")
GATHER_OPS = ("aten::index", "aten::gather", "aten::index_select", "aten::scatter", "aten::scatter_",
              "aten::scatter_add_", "aten::cat", "aten::masked_fill", "aten::masked_fill_", "aten::nonzero",
              "aten::sort", "aten::topk", "aten::argsort", "aten::index_put_", "aten::masked_scatter",
              "aten::take_along_dim", "aten::copy_", "aten::where")


# ---- measurement helpers ---------------------------------------------------------------------------------
#: the timer of `interleaved`: wall time (default) or this process's CPU time (`--clock cpu`: with one
#: thread, robust to other processes sharing the CPU, but blind to waiting)
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: str = "cpu",
                log: Callable[[str], None] | None = None, outputs: dict | None = None,
                memory: dict | None = None,
                stop: Callable[[int], bool] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed rounds, then `repeats` rounds in which every
    function runs once, the order rotated by one each round (no function always follows the same one).
    `outputs` receives each function's first result; `memory` its peak memory growth in the first call
    (a warm-up call when there is one). `stop(rounds_done)`, asked after every round but the last, ends the
    timing early (a time budget, `TimeGuard.rounds`): every function then has the same number of rounds,
    at least one."""
    names = list(fns)
    for w in range(warmup):
        for n in names:
            if w == 0 and memory is not None:
                with RssPeak(device) as p:
                    out = fns[n]()
                memory[n] = p.peak_delta
            else:
                out = fns[n]()
            if outputs is not None:
                outputs.setdefault(n, out)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync(device)
            if memory is not None and n not in memory:
                with RssPeak(device) as p:
                    t0 = CLOCK[0]()
                    out = fns[n]()
                    _sync(device)
                    times[n].append(CLOCK[0]() - t0)
                memory[n] = p.peak_delta
            else:
                t0 = CLOCK[0]()
                out = fns[n]()
                _sync(device)
                times[n].append(CLOCK[0]() - t0)
            if outputs is not None:
                outputs.setdefault(n, out)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
        if stop is not None and r + 1 < repeats and stop(r + 1):
            break
    return times


class TimeGuard:
    """The wall-clock budget of an unattended run (`--gpu-full`). Timing loops ask `rounds(...)` for a stop
    rule: a loop may use a share of the time left when it starts and ends, after at least one round, before
    a round that would cross its deadline (judged by the length of the round before). Whole steps ask
    `allows` with their estimated cost. Every early stop or skip is kept in `events` (the report lists
    them). `clock` is injectable (tests use a fake one)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.perf_counter, end: float | None = None):
        self.clock = clock
        self.budget_s = float(budget_s)
        self.end = clock() + self.budget_s if end is None else end
        self.events: list[str] = []

    def remaining(self) -> float:
        return self.end - self.clock()

    def child(self, share: float) -> "TimeGuard":
        """A guard over `share` (0-1] of the time left now (one architecture of the run); its events are
        this guard's."""
        rem = max(0.0, self.remaining())
        g = TimeGuard(share * rem, self.clock, end=self.clock() + share * rem)
        g.events = self.events
        return g

    def allows(self, what: str, estimate_s: float) -> bool:
        """Whether a step estimated at `estimate_s` fits in the time left; a step that does not is recorded
        as skipped."""
        rem = self.remaining()
        if estimate_s <= rem:
            return True
        self.events.append(f"{what}: skipped (estimated {estimate_s:.0f} s, {max(rem, 0):.0f} s of the time "
                           "budget left)")
        return False

    def rounds(self, what: str, planned: int, share: float = 1.0) -> Callable[[int], bool]:
        """The `stop` rule of `interleaved` for a loop of `planned` rounds that may use `share` of the time
        left now (and never past this guard's end)."""
        start = self.clock()
        deadline = min(self.end, start + share * max(0.0, self.end - start))
        last = [start]  # the end of the previous round (the first one's start: memory sampling, warm-up)

        def stop(done: int) -> bool:
            now = self.clock()
            round_s, last[0] = now - last[0], now
            if now + round_s <= deadline:
                return False
            self.events.append(f"{what}: stopped after {done} of {planned} rounds (time budget)")
            return True
        return stop


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    return float((max(xs) - min(xs)) / statistics.median(xs)) if xs else float("nan")


def paired_ratios(ref: list[float], xs: list[float]) -> list[float]:
    """ref[i] / xs[i] for each round i: the two ran in the same round of `interleaved`."""
    return [a / b for a, b in zip(ref, xs, strict=True)]


def quartiles(xs: list[float]) -> list[float]:
    """[first, third] quartile (inclusive method); both equal the value for a single repetition."""
    if len(xs) < 2:
        return [float(xs[0])] * 2
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()
    slug = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    slug = re.sub(r"-(cpu|processor)(-|$)", r"\2", slug)
    return slug[:60] or "unknown"


class RssPeak:
    """Peak resident memory during a block (CPU: sampled RSS; CUDA: max allocated)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from harness.efficiency.latency import _RssSampler

            self._s = _RssSampler(interval=0.001)
            self._s.__enter__()
            self.before = self._s.before
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_delta = int(torch.cuda.max_memory_allocated() - self.before)
        else:
            self._s.__exit__(*exc)
            self.peak_delta = int(max(0, self._s.peak - self.before))


def _now(device: str) -> float:
    """The bench's clock after the device's queued work is done (CUDA kernels run asynchronously: a host
    clock read without a synchronisation times their launches, not their work)."""
    _sync(device)
    return CLOCK[0]()


def method_work_times(model, fn: Callable[[], Any], repeats: int = 3, device: str = "cpu") -> dict[str, float] | None:
    """Seconds of `fn()` spent in an in-LLM method's own work -- the reduction plan's scoring and
    merging calls (`before_layer`, `after_attention`: attention rows, softmax, top-k, quantiles,
    weighted merges) -- and in total (the bench's clock, median over `repeats`; on CUDA synchronised at
    every boundary). None when the model has no LLM reducer."""
    from methods._shared.llm_reduce import get_reducer

    red = get_reducer(model)
    if red is None:
        return None
    plan = red.plan
    acc = [0.0]
    originals = {n: getattr(plan, n) for n in ("before_layer", "after_attention")}

    def timed(f):
        def g(*a, **k):
            t0 = _now(device)
            try:
                return f(*a, **k)
            finally:
                acc[0] += _now(device) - t0
        return g

    own, totals = [], []
    for n, f in originals.items():
        setattr(plan, n, timed(f))
    try:
        for _ in range(repeats):
            acc[0] = 0.0
            t0 = _now(device)
            fn()
            totals.append(_now(device) - t0)
            own.append(acc[0])
    finally:
        for n in originals:
            delattr(plan, n)  # back to the class methods
    return {"own_s": med(own), "total_s": med(totals)}


def component_times(model, fn: Callable[[], Any], repeats: int = 1, device: str = "cpu") -> dict[str, float]:
    """Seconds spent in the vision tower, projector, language model and lm_head during `fn()` (forward
    hooks, the bench's clock, on CUDA synchronised at every hook; median over `repeats` calls)."""
    from harness.models import get_adapter

    ad = get_adapter(model)
    mods = {"vision": ad.vision_tower, "projector": ad.projector, "llm": ad.language_model, "lm_head": ad.lm_head}
    acc: dict[str, list[float]] = {c: [] for c in mods}
    cur: dict[str, float] = {}
    handles = []
    for c, mod in mods.items():
        def pre(_m, _i, c=c):
            cur[c] = _now(device)

        def post(_m, _i, _o, c=c):
            acc[c][-1] += _now(device) - cur.pop(c)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    totals = []
    try:
        for _ in range(repeats):
            for c in acc:
                acc[c].append(0.0)
            t0 = _now(device)
            fn()
            totals.append(_now(device) - t0)
    finally:
        for h in handles:
            h.remove()
    out = {c: med(v) for c, v in acc.items()}
    out["total"] = med(totals)
    out["outside"] = out["total"] - sum(out[c] for c in mods)
    return out


def profile_prefill(fn: Callable[[], Any], top: int = 8, device: str = "cpu") -> dict:
    """One profiled call: self time per operator, grouped into matmul / attention / gather-index-copy /
    other. On CPU the operators' self CPU time; on CUDA their kernels' self device time (the host-side
    CPU time of a CUDA operator is only its launch), recorded as `time`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        _sync(device)
    ev = prof.key_averages()

    def self_us(e) -> float:
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    ops = sorted(((e.key, self_us(e) / 1e3, e.count) for e in ev), key=lambda x: -x[1])
    ops = [o for o in ops if o[1] > 0 or not cuda]  # on CUDA: operators that ran kernels
    groups = {"matmul": 0.0, "attention": 0.0, "gather/index/copy": 0.0, "other": 0.0}
    for k, ms, _ in ops:
        g = ("matmul" if k in MATMUL_OPS else "attention" if k in ATTN_OPS else
             "gather/index/copy" if k in GATHER_OPS else "other")
        groups[g] += ms
    return {"total_ms": sum(groups.values()), "groups_ms": groups,
            "time": "self CUDA kernel time" if cuda else "self CPU time",
            "top": [{"op": k, "self_ms": round(ms, 2), "calls": c} for k, ms, c in ops[:top]]}
