"""Latency, memory, KV-cache size and visual tokens per layer of one (possibly patched) model.

Protocol of `measure(model, inputs)` (everything under `torch.inference_mode()`):

* The timed run is Hugging Face `generate` itself (greedy, exactly `decode_tokens + 1` new tokens), so
  positions, masks and the cache are handled as in real use. Forward hooks on the top-level model time
  every forward call: the **first** call is the prefill (vision tower + projector + LLM over the prompt,
  producing the first token with a KV cache: time to first token without the sampling overhead); each
  later call is **one decode step** (one token per sample with the cache). Time spent in `generate`
  between forwards (logits processing, stopping criteria) is not included.
* `warmup` untimed `generate` runs, then `repeats` timed runs. Prefill: median, min, max, IQR over the
  repeats. Decode per token: median, min, max, IQR over all steps of all repeats.
* Clock: CUDA events (synchronised once per run) on GPU; `time.perf_counter` on CPU.
* Peak memory: GPU — `torch.cuda.max_memory_allocated` during the timed runs, reported as the peak and
  as the increase over the memory allocated before (weights + inputs). CPU — the process RSS sampled
  every ~2 ms by a background thread during the timed runs, reported as the increase over the RSS
  before; `ru_maxrss` (the process-lifetime maximum, so not attributable to this run) is reported
  alongside for reference only.
* KV cache: bytes of every layer's key and value tensors in the `DynamicCache` right after a prefill
  (layers may hold different lengths, e.g. after token pruning).
* Visual tokens alive at the input of each LLM layer during prefill: what a method logged in
  `methods._shared.context.get_context(model).visual_tokens_per_layer`, else the dense count (the image
  tokens of the prompt) for every layer; per sample (mean over the batch if samples differ).
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch


def _stats(xs: list[float]) -> dict[str, float]:
    """median, min, q1, q3, max, IQR and count of timings (the spread is reported, never only a median)."""
    if not xs:
        nan = float("nan")
        return {"median": nan, "min": nan, "q1": nan, "q3": nan, "max": nan, "iqr": nan, "n": 0}
    xs = sorted(xs)
    q1, q3 = statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) >= 2 else (xs[0], xs[0])
    return {"median": statistics.median(xs), "min": xs[0], "q1": q1, "q3": q3, "max": xs[-1], "iqr": q3 - q1,
            "n": len(xs)}


def _device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to(inputs: dict, device, dtype) -> dict:
    """Tensors to the model's device; floating-point ones (pixel values) to its dtype."""
    return {
        k: ((v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v)
        for k, v in dict(inputs).items()
    }


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of every layer of a (Dynamic)Cache."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):  # older cache layout
        for t in getattr(cache, name, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_cache_lengths(cache) -> list[int]:
    layers = getattr(cache, "layers", None) or []
    return [int(l.keys.shape[-2]) if isinstance(getattr(l, "keys", None), torch.Tensor) else 0 for l in layers]


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Pairs (start, end) of marks -> durations in ms."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[i].elapsed_time(self.marks[i + 1]) for i in range(0, len(self.marks) - 1, 2)]
        return [1000.0 * (self.marks[i + 1] - self.marks[i]) for i in range(0, len(self.marks) - 1, 2)]


class _RssSampler:
    """Samples the process RSS in a background thread (CPU peak memory of a region)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def visual_tokens_per_layer(model, inputs: dict) -> tuple[list[float], str]:
    """Visual tokens alive at each LLM layer input in the last prefill (see module docstring)."""
    from harness.models import get_adapter

    try:
        from methods._shared.context import get_context
    except Exception:  # pragma: no cover - methods package absent
        get_context = lambda m: None  # noqa: E731
    ctx = get_context(model)
    logged = getattr(ctx, "visual_tokens_per_layer", None) if ctx is not None else None
    if logged:
        return [float(x) for x in logged], "method"
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    counts = adapter.visual_mask(ids).sum(dim=1).float()
    n = float(counts.mean())
    return [n] * adapter.num_llm_layers, "dense"


def pad_token_id(model) -> int | None:
    """The pad id `generate` needs: the generation config's, the text config's, else the first EOS id."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model.config, "text_config", model.config), "pad_token_id", None)
    if pad is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return pad


def measure(model, inputs: dict, *, warmup: int = 1, repeats: int = 3, decode_tokens: int = 8) -> dict[str, Any]:
    """Prefill latency, decode latency per token, peak memory, KV-cache bytes and visual tokens per
    layer of `model` on processor `inputs` (one batch). Times in milliseconds, sizes in bytes."""
    from transformers import DynamicCache

    if repeats < 1 or warmup < 0 or decode_tokens < 1:
        raise ValueError("measure: repeats >= 1, warmup >= 0 and decode_tokens >= 1 are required")
    device = _device_of(model)
    dtype = next(iter(model.parameters())).dtype
    inputs = _to({k: v for k, v in dict(inputs).items() if v is not None}, device, dtype)
    ids = inputs["input_ids"]
    gen_kwargs = dict(
        max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, do_sample=False,
        num_beams=1, use_cache=True,
    )
    pad = pad_token_id(model)
    if pad is not None:
        gen_kwargs["pad_token_id"] = pad

    with torch.inference_mode():
        # KV cache after one prefill + visual tokens per layer of that prefill
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv_bytes = kv_cache_bytes(cache)
        kv_lengths = kv_cache_lengths(cache)
        vis_layers, vis_source = visual_tokens_per_layer(model, inputs)
        del cache

        for _ in range(warmup):
            model.generate(**inputs, **gen_kwargs)

        clock = _Clock(device)
        handles = [
            model.register_forward_pre_hook(lambda *_: clock.mark()),
            model.register_forward_hook(lambda *_: clock.mark()),
        ]
        prefill_ms: list[float] = []
        decode_ms: list[float] = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            mem_before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            sampler = None
        else:
            sampler = _RssSampler()
        try:
            ctx = sampler if sampler is not None else contextlib.nullcontext()
            with ctx:
                for _ in range(repeats):
                    clock.marks = []
                    model.generate(**inputs, **gen_kwargs)
                    iv = clock.intervals_ms()
                    prefill_ms.append(iv[0])
                    decode_ms.extend(iv[1:])
        finally:
            for h in handles:
                h.remove()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            memory = {"kind": "cuda_allocated", "peak_bytes": int(peak), "before_bytes": int(mem_before),
                      "peak_delta_bytes": int(peak - mem_before)}
        else:
            memory = {"kind": "cpu_rss_sampled", "peak_bytes": int(sampler.peak), "before_bytes": int(sampler.before),
                      "peak_delta_bytes": int(max(0, sampler.peak - sampler.before)),
                      "ru_maxrss_lifetime_bytes": _ru_maxrss_bytes()}

    return {
        "device": str(device),
        "clock": "cuda_events" if device.type == "cuda" else "perf_counter",
        "batch_size": int(ids.shape[0]),
        "prompt_tokens": int(ids.shape[1]),
        "warmup": warmup,
        "repeats": repeats,
        "decode_tokens": decode_tokens,
        "prefill_ms": _stats(prefill_ms),
        "decode_ms_per_token": _stats(decode_ms),
        "prefill_times_ms": prefill_ms,
        "decode_times_ms": decode_ms,
        "memory": memory,
        "kv_cache_bytes": int(kv_bytes),
        "kv_cache_lengths": kv_lengths,
        "visual_tokens_per_layer": vis_layers,
        "visual_tokens_source": vis_source,
    }

