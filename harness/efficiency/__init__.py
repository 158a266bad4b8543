"""Efficiency measurement: FLOPs (counted per component and analytic, in every paper convention),
latency, peak memory, KV-cache size and visual tokens per layer.

* `harness.efficiency.analytic` — the FLOPs formulas (MACs), one place;
* `harness.efficiency.flops` — counted FLOPs of the actual (patched) model: `count_prefill`,
  `count_decode` -> `FlopsCount` (fvcore on real weights, torch's FlopCounterMode formulas on the meta device);
* `harness.efficiency.conventions` — the papers' conventions (ShortV, FastV, FiCoCo) and ours (full);
* `harness.efficiency.latency` — `measure(model, inputs)`: prefill / per-token decode latency, memory,
  KV-cache bytes, visual tokens per layer (the runner's per-cell probe, `probe.py`, builds on these).

FLOPs = 2 x MACs everywhere (fvcore's "flops" are MACs and are doubled).
"""
from harness.efficiency.flops import FlopsCount, count_decode, count_prefill, count_prefill_and_decode

__all__ = ["FlopsCount", "count_decode", "count_prefill", "count_prefill_and_decode"]
