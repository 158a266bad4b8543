"""`make bench`: performance benchmark of the harness and of every method, as ratios from one run.

    vtbench-bench [--out results/bench] [--quick] [--repeats N] [--parts overhead,methods,...]

Parts (all by default):

* ``overhead`` — method ``none`` through the harness path (config-style checkpoint loading by
  `harness.models.loading.load_model`, `methods.build('none').apply`, the lmms-eval wrapper
  `VTBenchLMM.generate_batch`: prompt building, processor, `generate`, finiteness check, decoding) versus
  calling Hugging Face directly (`AutoProcessor` + `AutoModelForImageTextToText.from_pretrained` of the same
  checkpoint: processor, then a forward / `generate`), same inputs, interleaved repetitions. Prefill = the
  harness asked for 1 new token vs the direct forward with logits for the last position; generate = 16 tokens.
* ``methods`` — every method at one common budget on a mid-size random LLaVA-1.5-shaped model (vision tower
  336 px / 576 tokens, LLM d=1024, 16 layers), batch 1: prefill time measured against ``none`` in the same run
  (interleaved repetitions, median), speed-up predicted by counted FLOPs (fvcore on the patched model) and
  measured/predicted; the same for end-to-end generation of 16 tokens (predicted: counted prefill + one counted
  decode step, later steps analytic from the per-layer cache lengths). A method under its target is profiled
  (torch.profiler, one prefill beside one of ``none``) and the time gap is split by operator class.
* ``scores`` — FastV and FiCoCo-L scoring from attention rows computed beside SDPA (ours) versus the reference
  approach of materialising attention weights with eager attention: on the scoring layer(s) only, and on every
  layer with ``output_attentions=True`` as the released code paths do; time and sampled peak RSS.
* ``batch`` — batched evaluation through the lmms-eval wrapper with left padding: 8 prompts of different
  lengths at batch 1 (8 calls) vs batch 8 (one call); predictions compared, throughput ratio.
* ``flops`` — wall time of ``vtbench-flops model=llava15_13b method=<m>`` (subprocess) for every method.
* ``sweep`` — one small `vtbench -m` sweep (tiny model, shapes, none/random/fastv/tome) answered serially and by
  parallel worker processes (`run.workers=auto`): cells per minute of each, and each cell's latency medians
  from the parallel run against the serial run's interquartile range (`harness.bench.sweep`).

Output: ``<out>/<machine>.md`` (the report), ``<machine>.csv`` (the methods table) and ``<machine>.json``
(everything). ``--quick`` runs a tiny model with 1 repetition (the smoke test); its numbers mean nothing.

``--gpu-full`` (``make bench-gpu``) is the GPU run: the full-size LLaVA-1.5-7B and LLaVA-NeXT-7B architectures
with random fp16 weights (`build_full`), every method and composition, the methods / scores / batch parts, one
after the other under a wall-clock budget (`TimeGuard`, `run_gpu_full`); reports
``<out>/<gpu>-<arch>.{md,csv,json}``. Without a CUDA GPU it prints one line and exits 0.
"""
from __future__ import annotations

from harness.bench.batch import BatchPart
from harness.bench.core import Bench
from harness.bench.counting import CountingPart, FLOOR, IMPORT_FLOOR, flops_cli_params
from harness.bench.gpu import (GPU_ARCHS, GPU_ARCH_WEIGHT, GPU_BATCH_METHODS, GPU_BUDGET_S, GPU_GEN_REPEATS,
    GPU_PARTS, GPU_REPEATS, NO_GPU_LINE, gpu_spec, run_gpu_full)
from harness.bench.measure import (ATTN_OPS, CLOCK, GATHER_OPS, MATMUL_OPS, RssPeak, TimeGuard, component_times,
    cpu_model, interleaved, loadavg, machine_name, med, method_work_times, paired_ratios, profile_prefill, quartiles,
    spread)
from harness.bench.methods import MethodsPart
from harness.bench.overhead import OverheadPart
from harness.bench.render import COUNTERS, bench_meta, explain_misses, render, write_csv, write_report
from harness.bench.scores import ScoresPart, keep_eager_weights, scoring_layers
from harness.bench.sweep import SWEEP_METHODS, SweepPart, compare_sweeps, render_sweep
from harness.bench.setup import (ALL_METHODS, BUDGET_TOKENS, COMPOSITIONS, FULL_FAMILIES, METHODS, OVERHEAD_TARGET,
    PARTS, Spec, TARGETS, bench_image_size, build_full, build_model, full_config, full_processor, kv_cache_bytes,
    make_image, make_question, method_settings, share_weights_copy, shortv_layers)

__all__ = ["ALL_METHODS", "BUDGET_TOKENS", "COMPOSITIONS", "FULL_FAMILIES", "METHODS", "OVERHEAD_TARGET", "PARTS",
           "Spec", "TARGETS", "bench_image_size", "build_full", "build_model", "full_config", "full_processor",
           "kv_cache_bytes", "make_image", "make_question", "method_settings", "share_weights_copy", "shortv_layers",
           "ATTN_OPS", "CLOCK", "GATHER_OPS", "MATMUL_OPS", "RssPeak", "TimeGuard", "component_times", "cpu_model",
           "interleaved", "loadavg", "machine_name", "med", "method_work_times", "paired_ratios", "profile_prefill",
           "quartiles", "spread", "OverheadPart", "MethodsPart", "ScoresPart", "keep_eager_weights",
           "scoring_layers", "SWEEP_METHODS", "SweepPart", "compare_sweeps", "render_sweep", "BatchPart", "CountingPart", "FLOOR", "IMPORT_FLOOR", "flops_cli_params", "Bench",
           "COUNTERS", "bench_meta", "explain_misses", "render", "write_csv", "write_report", "GPU_ARCHS",
           "GPU_ARCH_WEIGHT", "GPU_BATCH_METHODS", "GPU_BUDGET_S", "GPU_GEN_REPEATS", "GPU_PARTS", "GPU_REPEATS",
           "NO_GPU_LINE", "gpu_spec", "run_gpu_full"]
