"""The efficiency probe of a cell: FLOPs, latency, memory, KV cache on a fixed probe subset.

The probe set is the first `run.efficiency.probe_size` documents of the benchmark (the same for every
method, so methods are compared on the same inputs), each encoded exactly as the evaluation encodes it
(same prompt, same processor) and measured at batch 1:

* FLOPs counted with fvcore on the patched model (prefill per component, one decode step), beside the
  method's analytic formula for the same token layout, on the first `run.efficiency.flops_docs` probe
  documents (default 1: the FLOPs of one prompt, as the papers' tables give them; mean over them when
  more). The count of a method depends on the prompt's token layout only (how many text tokens, visual
  tokens, images), so each distinct layout is counted once per (model, method parameters) and kept
  (`CountCache`: in this process and on disk under `$VTBENCH_CACHE/flops/`, keyed by the model's identity,
  the method's resolved parameters, the layout, vtbench's code and the counting packages' versions): a
  cell that meets a layout counted before -- in the same sweep, a rerun, a forced cell -- traces nothing;
* latency (time to first token, decode per token), peak memory, KV-cache bytes and visual tokens per
  LLM layer with `harness.efficiency.latency.measure` on all `probe_size` documents: median and spread
  (min, quartiles, max) over every timed repeat of every document. The `warmup` generate calls run once,
  before the first timed document (the first call pays the one-off costs; later documents reuse them).
  This timing part runs after the counting, alone on the device: under the device's exclusive lock (no other
  vtbench process computes on it meanwhile) and with the threads a serial run uses (`harness.execution`);
  the record says so (`efficiency.latency.taken`, `.threads`).

The probe's cost is bounded by these settings and shown in the record (`timing.efficiency_seconds`, and
`efficiency.flops_layouts_counted` / `flops_layouts_reused`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from harness.efficiency import flops as F
from harness.efficiency.latency import measure


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.fmean(xs)) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _spread(xs: list[float]) -> dict:
    from harness.efficiency.latency import _stats

    return {k: (float(v) if k != "n" else int(v)) for k, v in _stats(xs).items()} if xs else {"median": None, "n": 0}


def _delivered(model, layout, count) -> int | None:
    """Visual tokens the patched model's last prefill ran its last LLM layer with (the visual-token
    context of `methods._shared.context`); the prompt's own count for an unpatched model, None when the
    count was not a real forward (analytic fallback)."""
    from methods._shared.context import get_context

    if count.source != "counted":
        return None
    ctx = get_context(model)
    if ctx is None or ctx.visual_tokens_final is None:
        return layout.visual
    return int(ctx.visual_tokens_final)


def probe_inputs(lm, task_dict, n: int) -> list[dict]:
    """Processor inputs of the first `n` documents of the (single) task, encoded like the evaluation."""
    (task,) = [t for t in task_dict.values() if hasattr(t, "test_docs")][:1] or [None]
    if task is None:
        return []
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    out = []
    for i, doc in enumerate(docs):
        if i >= n:
            break
        context = task.doc_to_text(doc)
        visuals = task.doc_to_visual(doc) if callable(task.doc_to_visual) else []
        out.append(lm.encode([context], [list(visuals or [])]))
    return out


# ---- FLOPs counts, once per (model, method parameters, token layout) --------------------------------
_COUNTS: dict[str, dict] = {}  # in-process layer over the disk cache
_COUNT_VERSION = 1


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _count_from_dict(d) -> F.FlopsCount | None:
    """A stored FlopsCount, validated field by field (None if anything is off: it is counted again)."""
    if not isinstance(d, dict):
        return None
    flops, ops, kv = d.get("flops"), d.get("unsupported_ops"), d.get("kv_lengths")
    ok = (d.get("phase") in ("prefill", "decode") and isinstance(flops, dict) and flops
          and all(isinstance(k, str) and _is_count(v) for k, v in flops.items())
          and isinstance(ops, dict) and all(isinstance(k, str) and _is_count(v) for k, v in ops.items())
          and isinstance(kv, list) and all(_is_count(v) for v in kv)
          and all(_is_count(d.get(k)) for k in ("batch_size", "seq_len", "context"))
          and d.get("total") == sum(flops.values()) and d.get("source") == "counted"
          and isinstance(d.get("counter"), str) and isinstance(d.get("note"), str))
    if not ok:
        return None
    return F.FlopsCount(phase=d["phase"], flops=dict(flops), source="counted", counter=d["counter"],
                        unsupported_ops=dict(ops), batch_size=d["batch_size"], seq_len=d["seq_len"],
                        context=d["context"], note=d["note"], kv_lengths=list(kv))


def _artefact_fields() -> frozenset[str]:
    """The parameter names that hold calibration artefact paths (`calibration_fields` of every method)."""
    import methods

    return frozenset(f for n in methods.available() for f in getattr(methods.get(n), "calibration_fields", ()))


def _file_aware(value, fields: frozenset[str] | None = None, key: str | None = None):
    """Method parameters with every calibration artefact (a parameter named in a method's
    `calibration_fields`, at any depth: composition members included) replaced by its content digest, so
    a count is keyed by what the artefact says, not where it lies. Other strings stay as they are."""
    fields = _artefact_fields() if fields is None else fields
    if isinstance(value, dict):
        return {k: _file_aware(v, fields, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_file_aware(v, fields) for v in value]
    if key in fields and isinstance(value, str) and os.path.isfile(value):
        from harness.fingerprint import file_digest

        return {"file_sha256": file_digest(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class CountCache:
    """FLOPs counts (prefill + one decode step) of one patched model by token layout.

    A count depends on the architecture, the weights' dtype, the method and its resolved parameters and
    the token layout only (tests/efficiency/test_flops_counted.py checks that two prompts of one layout
    count the same for every method). The key covers all of them plus the model's full identity (its
    checkpoint digest: nothing is assumed about weights), vtbench's own code and the counting packages'
    versions, so a stale count is never served. Entries are sealed JSON (`harness.schema.dumps_sealed`) and
    validated when read (seal, then fields); a bad one is counted again, silently. `base=None` keeps counts in this call only (no identity known)."""

    def __init__(self, base: dict | None):
        self.base = None if base is None else json.dumps(base, sort_keys=True, default=str)

    def _key(self, layout) -> str | None:
        if self.base is None:
            return None
        raw = json.dumps({"v": _COUNT_VERSION, "base": self.base, "layout": repr(layout)}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    @staticmethod
    def _path(key: str) -> Path:
        from harness.fingerprint import cache_dir

        return cache_dir() / "flops" / f"{key}.json"

    def get(self, layout):
        """`(prefill, decode or None, decode_source, delivered)` of a layout counted before, or None."""
        key = self._key(layout)
        if key is None:
            return None
        entry = _COUNTS.get(key)
        if entry is None:
            from harness.schema import SchemaError, loads_sealed

            try:  # sealed JSON: a hand-edited, truncated or unsealed entry is counted again (it is a cache)
                entry = loads_sealed(self._path(key).read_bytes())
            except (OSError, SchemaError):
                return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        c = _count_from_dict(entry.get("prefill"))
        d = None if entry.get("decode") is None else _count_from_dict(entry["decode"])
        delivered, decode_source = entry.get("delivered"), entry.get("decode_source")
        if (c is None or (entry.get("decode") is not None and d is None) or not isinstance(decode_source, str)
                or not (delivered is None or _is_count(delivered))):
            return None
        _COUNTS[key] = entry
        return c, d, decode_source, delivered

    def put(self, layout, c, d, decode_source: str, delivered) -> None:
        key = self._key(layout)
        if key is None or c.source != "counted":  # a failed count is never kept: the next cell tries again
            return
        entry = {"key": key, "prefill": c.to_dict(), "decode": d.to_dict() if d is not None else None,
                 "decode_source": decode_source, "delivered": delivered}
        _COUNTS[key] = entry
        from harness.results import atomic_write_text
        from harness.schema import dumps_sealed

        try:  # atomic: a concurrent reader sees the old file or the new one
            atomic_write_text(self._path(key), dumps_sealed(entry))
        except OSError:  # a read-only cache costs time, never correctness
            pass


def count_cache_base(cfg, method) -> dict:
    """What a cell's FLOPs counts depend on (the key of its `CountCache`)."""
    from harness.config import resolved
    from harness.environment import code_fingerprint, versions
    from harness.results import cell_identity

    ident = cell_identity(resolved(cfg))
    return {"model": ident["model"], "device": ident["device"],
            "method": {"name": method.name, "params": _file_aware(method.params())},
            "code": code_fingerprint(), "software": versions(("torch", "transformers", "fvcore"))}


def _count(model, method, config, inputs, layout):
    """(prefill, decode or None, source, decode_source, delivered) of one prompt, counted now."""
    source = decode_source = "counted"
    try:
        c = F.count_prefill(model, inputs)
    except Exception as e:  # a method whose code fvcore cannot trace: labelled analytic numbers
        source = f"analytic (fvcore failed: {type(e).__name__})"
        c = F.analytic_count(config, layout, method=method)
    try:  # the decode step is counted on its own: its failure never hides a counted prefill
        d = F.count_decode(model, inputs) if source == "counted" else None
    except Exception as e:
        decode_source = f"not counted (fvcore failed: {type(e).__name__})"
        d = None
    return c, d, source, decode_source, _delivered(model, layout, c)


def measure_inputs(model, method, inputs_list: list[dict], *, warmup=1, repeats=3, decode_tokens=8,
                   progress=None, flops_docs: int | None = None, cache: CountCache | None = None,
                   timed=None) -> dict[str, Any]:
    """Efficiency figures of `model` over a list of batch-1 inputs; `progress(i, n)` is called before each.
    FLOPs on the first `flops_docs` inputs (all when None), latency and memory on all of them, after the
    counting, all inside `timed()` (a context manager: the timing part of the cell, e.g. holding its device
    alone; `harness.execution`)."""
    config = model.config
    cache = cache or CountCache(None)
    n_flops = len(inputs_list) if flops_docs is None else min(int(flops_docs), len(inputs_list))
    pre, dec, ana, ana_dec, unsupported = [], [], [], [], {}
    lat = []
    visual_in, to_llm, to_llm_ana = [], [], []
    source = decode_source = "counted"
    counted: dict = {}
    reused = 0
    for i, inputs in enumerate(inputs_list):
        (layout,) = F.layouts_from_inputs(config, inputs)
        visual_in.append(layout.visual)
        if i < n_flops:
            a = F.analytic_prefill(config, layout, method=method)
            ana.append(a | {"total": sum(a.values())})
            if layout not in counted:  # FLOPs depend on the token layout only: count each layout once
                hit = cache.get(layout)
                if hit is not None:
                    reused += 1
                    c, d, dsrc, delivered = hit
                    counted[layout] = (c, d, "counted", dsrc, delivered)
                else:
                    counted[layout] = _count(model, method, config, inputs, layout)
                    cache.put(layout, *[counted[layout][k] for k in (0, 1, 3, 4)])
            c, d, src, dsrc, delivered = counted[layout]
            if src != "counted":
                source = src
            if dsrc != "counted":
                decode_source = dsrc
            pre.append(c.flops | {"total": c.total})
            to_llm.append(delivered)
            to_llm_ana.append(method.visual_tokens_kept(layout) if method is not None else layout.visual)
            if d is not None:
                dec.append(d.flops | {"total": d.total})
                ad = F.analytic_decode(config, d.context, kv_lengths=getattr(d, "kv_lengths", None) or None)
                ana_dec.append(ad | {"total": sum(ad.values())})
            for op, k in c.unsupported_ops.items():
                unsupported[op] = unsupported.get(op, 0) + k
    # the timing part, after every count: latency, memory and KV cache of every document; the warm-up calls
    # run before the first timed document only
    with timed() if timed is not None else contextlib.nullcontext():
        for i, inputs in enumerate(inputs_list):
            if progress is not None:
                progress(i, len(inputs_list))
            lat.append(measure(model, inputs, warmup=warmup if i == 0 else 0, repeats=repeats,
                               decode_tokens=decode_tokens))

    def mean_components(rows):
        keys = sorted({k for r in rows for k in r})
        return {k: _mean([r.get(k) for r in rows]) for k in keys}

    prefill = mean_components(pre)
    analytic = mean_components(ana)
    mismatches = mismatch_lines(counted, method, config)
    vis_layers = [m.get("visual_tokens_per_layer") for m in lat if m.get("visual_tokens_per_layer")]
    per_layer = [_mean(col) for col in zip(*vis_layers)] if vis_layers else None
    return {
        "probe_size": len(inputs_list),
        "flops_docs": n_flops,
        "flops_layouts_counted": len(counted) - reused,
        "flops_layouts_reused": reused,
        "visual_tokens_in": _mean(visual_in),
        "visual_tokens_llm": per_layer[0] if per_layer else _mean(visual_in),
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_mean_per_layer": _mean(per_layer) if per_layer else _mean(visual_in),
        # visual tokens after the method's last reduction, per prompt (the count a token budget is about):
        # as the patched model ran, and as `Method.visual_tokens_kept` predicts
        "visual_tokens_to_llm": _mean(to_llm),
        "visual_tokens_to_llm_analytic": _mean(to_llm_ana),
        # the runtime guard: where the patched model disagrees with what the method reports (counted !=
        # analytic prefill FLOPs, visual tokens reaching the LLM != `visual_tokens_kept`), one line each;
        # [] when they agree. Reports footnote such records; the probe prints a warning line
        "mismatches": mismatches,
        "flops": {
            "prefill": prefill,
            "decode_per_token": mean_components(dec),
            "analytic_prefill": analytic,
            "analytic_decode_per_token": mean_components(ana_dec),
            "counted_equals_analytic": source == "counted" and all(
                abs((prefill.get(k) or 0) - (analytic.get(k) or 0)) < 0.5 for k in analytic
            ),
            "source": source,
            "decode_source": decode_source if source == "counted" else source,
            "counter": "fvcore",
            "unsupported_ops": unsupported,
            "convention": "FLOPs = 2 x MACs of matrix products; prefill logits for the last position only",
        },
        "latency": {
            # over every timed repeat of every probe sample: median and spread (min, quartiles, max)
            "prefill_ms": _spread([t for m in lat for t in m["prefill_times_ms"]]),
            "decode_ms_per_token": _spread([t for m in lat for t in m["decode_times_ms"]]),
            "clock": lat[0].get("clock") if lat else None,
            "warmup": warmup,
            "repeats": repeats,
            "decode_tokens": decode_tokens,
        },
        "memory": {
            "peak_delta_bytes": _median([m["memory"].get("peak_delta_bytes") for m in lat]),
            "kind": lat[0]["memory"].get("kind") if lat else None,
        },
        "kv_cache_bytes": _median([m.get("kv_cache_bytes") for m in lat]),
    }


def _short(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f}"


def mismatch_lines(counted: dict, method, config) -> list[str]:
    """What the patched model did that the method's own formulas do not say, per counted token layout:
    counted prefill FLOPs != `analytic_prefill_macs`, or visual tokens reaching the LLM's last layer !=
    `visual_tokens_kept` (a method lacking the hook, or with a wrong one: tests/methods/test_conformance.py
    fails it; a record of it is marked, never silent)."""
    out: list[str] = []
    for layout, (c, _d, src, _dsrc, delivered) in counted.items():
        where = f"{layout.visual} visual tokens"
        if src == "counted":
            a = F.analytic_prefill(config, layout, method=method)
            diff = [k for k in sorted(set(a) | set(c.flops)) if abs((c.flops.get(k) or 0) - (a.get(k) or 0)) >= 0.5]
            if diff:
                parts = ", ".join(f"{k} {_short(c.flops.get(k) or 0)} vs {_short(a.get(k) or 0)}" for k in diff)
                out.append(f"counted prefill FLOPs differ from the method's analytic ones ({parts}; prompt of {where}): "
                           "Method.analytic_prefill_macs")
        kept = method.visual_tokens_kept(layout) if method is not None else layout.visual
        if delivered is not None and int(delivered) != int(kept):
            out.append(f"{delivered} visual tokens reached the LLM but the method reports {kept} (prompt of {where}): "
                       "Method.visual_tokens_kept")
    return list(dict.fromkeys(out))


def warn_mismatches(name: str, mismatches: list[str]) -> None:
    """One warning line on stderr naming what a record's method got wrong (`efficiency.mismatches`)."""
    import sys

    if mismatches:
        print(f"vtbench: warning: method {name}: " + "; ".join(mismatches)
              + " (recorded in efficiency.mismatches; tables footnote it)", file=sys.stderr, flush=True)


def measure_cell(cfg, model, processor, adapter, method, lm, task_dict) -> dict[str, Any]:
    eff = cfg.run.efficiency
    inputs_list = probe_inputs(lm, task_dict, int(eff.probe_size))
    import sys
    import time

    t0 = time.perf_counter()

    def progress(i, n):  # the probe takes seconds per sample: say where it is
        print(f"[vtbench] efficiency probe: sample {i + 1}/{n} (latency x{int(eff.repeats)}) "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    flops_docs = eff.get("flops_docs", 1)
    from harness.execution import device_lock, for_cell, latency_note, timing_threads

    ex, lock, taken = for_cell(cfg), device_lock(cfg.run.device), {}

    @contextlib.contextmanager
    def timed():  # alone on the device, with the threads a serial run uses (harness.execution)
        with lock.exclusive(), timing_threads(ex) as threads:
            taken.update(taken=latency_note(lock, threads), threads=threads)
            yield

    out = measure_inputs(
        model, method, inputs_list, warmup=int(eff.warmup), repeats=int(eff.repeats), decode_tokens=int(eff.decode_tokens),
        progress=progress, flops_docs=None if flops_docs is None else int(flops_docs),
        cache=CountCache(count_cache_base(cfg, method)), timed=timed,
    )
    warn_mismatches(method.name if method is not None else "none", out["mismatches"])
    out["latency"].update(taken)
    return out
