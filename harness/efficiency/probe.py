"""The efficiency probe of a cell: FLOPs, latency, memory, KV cache on a fixed probe subset.

The probe set is the first `run.efficiency.probe_size` documents of the benchmark (the same for every
method, so methods are compared on the same inputs), each encoded exactly as the evaluation encodes it
(same prompt, same processor) and measured at batch 1:

* FLOPs counted with fvcore on the patched model (prefill per component, one decode step), beside the
  method's analytic formula for the same token layout; mean over the probe documents. The count of a
  method depends on the prompt's token layout only (how many text tokens, visual tokens, images), so each
  distinct layout is counted once and its count reused for the documents that share it (on `shapes`
  every document has one layout: one count instead of `probe_size`);
* latency (time to first token, decode per token), peak memory, KV-cache bytes and visual tokens per
  LLM layer with `harness.efficiency.latency.measure`: median and spread (min, quartiles, max) over every
  timed repeat of every document.
"""
from __future__ import annotations

import statistics
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


def measure_inputs(model, method, inputs_list: list[dict], *, warmup=1, repeats=3, decode_tokens=8,
                   progress=None) -> dict[str, Any]:
    """Efficiency figures of `model` over a list of batch-1 inputs; `progress(i, n)` is called before each."""
    config = model.config
    pre, dec, ana, ana_dec, unsupported = [], [], [], [], {}
    lat = []
    visual_in, to_llm, to_llm_ana = [], [], []
    source = decode_source = "counted"
    counted: dict = {}
    for i, inputs in enumerate(inputs_list):
        if progress is not None:
            progress(i, len(inputs_list))
        (layout,) = F.layouts_from_inputs(config, inputs)
        visual_in.append(layout.visual)
        a = F.analytic_prefill(config, layout, method=method)
        ana.append(a | {"total": sum(a.values())})
        if layout in counted:  # FLOPs depend on the token layout only: count each layout once
            c, d, delivered = counted[layout]
        else:
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
            delivered = _delivered(model, layout, c)
            counted[layout] = (c, d, delivered)
        pre.append(c.flops | {"total": c.total})
        to_llm.append(delivered)
        to_llm_ana.append(method.visual_tokens_kept(layout) if method is not None else layout.visual)
        if d is not None:
            dec.append(d.flops | {"total": d.total})
            ad = F.analytic_decode(config, d.context, kv_lengths=getattr(d, "kv_lengths", None) or None)
            ana_dec.append(ad | {"total": sum(ad.values())})
        for op, k in c.unsupported_ops.items():
            unsupported[op] = unsupported.get(op, 0) + k
        lat.append(measure(model, inputs, warmup=warmup, repeats=repeats, decode_tokens=decode_tokens))

    def mean_components(rows):
        keys = sorted({k for r in rows for k in r})
        return {k: _mean([r.get(k) for r in rows]) for k in keys}

    prefill = mean_components(pre)
    analytic = mean_components(ana)
    vis_layers = [m.get("visual_tokens_per_layer") for m in lat if m.get("visual_tokens_per_layer")]
    per_layer = [_mean(col) for col in zip(*vis_layers)] if vis_layers else None
    return {
        "probe_size": len(inputs_list),
        "flops_layouts_counted": len(counted),
        "visual_tokens_in": _mean(visual_in),
        "visual_tokens_llm": per_layer[0] if per_layer else _mean(visual_in),
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_mean_per_layer": _mean(per_layer) if per_layer else _mean(visual_in),
        # visual tokens after the method's last reduction, per prompt (the count a token budget is about):
        # as the patched model ran, and as `Method.visual_tokens_kept` predicts
        "visual_tokens_to_llm": _mean(to_llm),
        "visual_tokens_to_llm_analytic": _mean(to_llm_ana),
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


def measure_cell(cfg, model, processor, adapter, method, lm, task_dict) -> dict[str, Any]:
    eff = cfg.run.efficiency
    inputs_list = probe_inputs(lm, task_dict, int(eff.probe_size))
    import sys
    import time

    t0 = time.perf_counter()

    def progress(i, n):  # the probe takes seconds per sample: say where it is
        print(f"[vtbench] efficiency probe: sample {i + 1}/{n} (FLOPs counted, latency x{int(eff.repeats)}) "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    return measure_inputs(
        model, method, inputs_list, warmup=int(eff.warmup), repeats=int(eff.repeats), decode_tokens=int(eff.decode_tokens),
        progress=progress,
    )
