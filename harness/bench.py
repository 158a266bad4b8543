"""`make bench`: performance benchmark of the harness and of every method, as ratios from one run.

    python -m harness.bench [--out results/bench] [--quick] [--repeats N] [--parts overhead,methods,...]

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

Output: ``<out>/<machine>.md`` (the report), ``<machine>.csv`` (the methods table) and ``<machine>.json``
(everything). ``--quick`` runs a tiny model with 1 repetition (the smoke test); its numbers mean nothing.

``--gpu-full`` (``make bench-gpu``) is the GPU run: the full-size LLaVA-1.5-7B and LLaVA-NeXT-7B architectures
with random fp16 weights (`build_full`), every method and composition, the methods / scores / batch parts, one
after the other under a wall-clock budget (`TimeGuard`, `run_gpu_full`); reports
``<out>/<gpu>-<arch>.{md,csv,json}``. Without a CUDA GPU it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import gc
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PARTS = ("overhead", "methods", "scores", "batch", "flops")
METHODS = ("none", "random", "fastv", "tome", "ficoco_v", "ficoco_l", "ficoco_vl", "shortv", "redundancylens")
#: the named compositions (conf/method/<name>.yaml, methods/compose.py); the methods part runs them on request
#: (`--methods`) and the GPU run (`--gpu-full`) always
COMPOSITIONS = ("shortv_fastv", "redundancylens_fastv")
ALL_METHODS = METHODS + COMPOSITIONS
#: measured / predicted prefill speed-up targets (issue 9.2)
TARGETS = {"fastv": 0.85, "tome": 0.85, "ficoco_v": 0.85, "ficoco_l": 0.85, "ficoco_vl": 0.85,
           "shortv": 0.8, "redundancylens": 0.8}
#: the common budget: visual tokens reaching the LLM, as a fraction of the image's (0.3333 x 576 = 192)
BUDGET_TOKENS = 1 / 3
OVERHEAD_TARGET = 0.03
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::einsum")
ATTN_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::softmax")
GATHER_OPS = ("aten::index", "aten::gather", "aten::index_select", "aten::scatter", "aten::scatter_",
              "aten::scatter_add_", "aten::cat", "aten::masked_fill", "aten::masked_fill_", "aten::nonzero",
              "aten::sort", "aten::topk", "aten::argsort", "aten::index_put_", "aten::masked_scatter",
              "aten::take_along_dim", "aten::copy_", "aten::where")


# ---- set-up ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """What the bench runs on; `quick` is the smoke-test scale."""

    quick: bool = False
    repeats: int = 5
    gen_repeats: int = 3
    gen_tokens: int = 16
    text_words: int = 30
    batch: int = 8
    batch_new_tokens: int = 8
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    model: dict = field(default_factory=dict)
    #: FLOP counter of the methods part (None: `count_prefill`'s default, fvcore on a real model)
    counter: str | None = None
    #: record each method's peak memory growth in its first timed prefill / generate (the GPU run)
    memory: bool = False

    @classmethod
    def make(cls, quick: bool, repeats: int | None, threads: int | None, device: str) -> "Spec":
        if quick:
            model = dict(image_size=112, patch_size=14, vision_hidden=32, vision_layers=4, hidden_size=64,
                         intermediate_size=128, num_layers=6, num_heads=4)
            s = cls(quick=True, repeats=repeats or 1, gen_repeats=repeats or 1, gen_tokens=4, text_words=8,
                    batch=4, batch_new_tokens=3, model=model)
        else:
            model = dict(image_size=336, patch_size=14, vision_hidden=256, vision_layers=8, hidden_size=1024,
                         intermediate_size=2816, num_layers=16, num_heads=16)
            # more prefill repetitions steady the medians on a noisy machine; generate / scores / batch stay
            # at 3 / 3 / 1 rounds (they take 2-10x longer per call)
            s = cls(repeats=repeats or 5, gen_repeats=min(3, max(1, (repeats or 5) * 3 // 5)), model=model)
        s.threads = threads or (torch.get_num_threads() if device.startswith("cuda") else 2)
        s.device = device
        if device.startswith("cuda") and not quick:
            s.dtype = "float16"
        return s


def build_model(spec: Spec):
    """The random model of the bench (seeded): LLaVA-1.5-shaped tiny/mid-size, or with `--arch llava15_7b`
    the full architecture (see `build_full`)."""
    from harness.models.tiny import build_tiny

    model, processor = build_tiny("llava", "llama", seed=0, **spec.model)
    dtype = getattr(torch, spec.dtype)
    return model.to(spec.device, dtype).eval(), processor


#: model families `build_full` builds (conf/model/<name>.yaml with `family:` one of these)
FULL_FAMILIES = ("llava", "llava_next")


def full_config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The transformers config of conf/model/<name>.yaml (its `arch` block), with optional Hydra overrides
    (e.g. ``model.arch.text_config.num_hidden_layers=2``: the tests build scaled-down copies this way).
    Refuses a family `build_full` cannot build (one-line ValueError)."""
    from harness.config import compose_config
    from harness.models.adapter import family_of
    from harness.models.loading import config_from_cfg

    cfg = compose_config([f"model={name}", *overrides])
    config = config_from_cfg(cfg.model)
    family = family_of(config)
    if family not in FULL_FAMILIES:
        raise ValueError(f"model={name}: family {family!r} has no full-size bench build "
                         f"(supported: {', '.join(FULL_FAMILIES)})")
    return config


def build_full(name: str, spec: Spec, overrides: list[str] | tuple[str, ...] = ()):
    """Full-size architecture from conf/model/<name>.yaml (LLaVA-1.5 or LLaVA-NeXT, dispatched on the
    config's model type by `AutoModelForImageTextToText`) with random weights created on `spec.device`
    (seeded; ``meta`` builds it without memory), plus the tiny tokenizer and a processor re-targeted at
    the config's image size, patch size and (NeXT) grid pinpoints. `overrides`: see `full_config`."""
    from transformers import AutoModelForImageTextToText

    from harness.models.tiny import make_tokenizer

    config = full_config(name, overrides)
    tok = make_tokenizer()
    config.image_token_id = config.image_token_index = tok.convert_tokens_to_ids("<image>")
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(tok))
    torch.manual_seed(0)
    with torch.device(spec.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, spec.dtype))
    model.set_attn_implementation("sdpa")
    if spec.device != "meta":
        with torch.no_grad():  # keep activations finite in fp16 with random weights
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
    return model.eval(), full_processor(model.config, tok)


def full_processor(config, tok):
    """A processor for `config` (LLaVA-1.5: CLIP crop at the tower's image size; LLaVA-NeXT: the anyres
    image processor on the config's `image_grid_pinpoints`) with `tok` (its `<image>` is the image token)."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from harness.models.adapter import family_of
    from harness.models.tiny import CHAT_TEMPLATE

    vc = config.vision_config
    s = int(vc.image_size)
    common = dict(tokenizer=tok, patch_size=vc.patch_size, num_additional_image_tokens=1,
                  vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE)
    if family_of(config) == "llava_next":
        pins = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                        image_grid_pinpoints=pins)
        return LlavaNextProcessor(image_processor=ip, **common)
    ip = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return LlavaProcessor(image_processor=ip, **common)


def bench_image_size(config) -> int:
    """Side of the square test image: the tower's input size (LLaVA-1.5: one crop), or for an anyres model
    the largest square grid pinpoint (LLaVA-NeXT-7B: 672 px -> the base crop + 2x2 crops, about 2,900
    visual tokens, its largest square case)."""
    pins = getattr(config, "image_grid_pinpoints", None)
    if pins:
        squares = [int(h) for h, w in pins if int(h) == int(w)]
        return max(squares) if squares else int(config.vision_config.image_size)
    return int(config.vision_config.image_size)


def make_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


_WORDS = "red green blue yellow purple orange white black circle square triangle star left right top bottom".split()


def make_question(n_words: int, seed: int = 0) -> str:
    """A question padded with vocabulary words to about `n_words` words (the tokenizer is tiny)."""
    words = [_WORDS[(seed * 7 + i * 3) % len(_WORDS)] for i in range(n_words)]
    return "What is shown in the image? " + " ".join(words) + " Answer with one word."


def share_weights_copy(model):
    """A deep copy of `model` whose parameters and buffers are the original tensors (methods patch module
    instances, never weights, so every method gets its own modules over one set of weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a `DynamicCache` (every layer, as a prefill left them)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def shortv_layers(num_layers: int) -> list[int]:
    """ShortV's LLaVA-1.5-7B layer list (conf/model_method/llava15_7b_shortv.yaml, 32 layers) mapped to
    `num_layers` layers (i -> floor(i * L / 32), duplicates dropped, order kept), first round(19/32 * L)."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR

    paper = list(OmegaConf.load(CONF_DIR / "model_method" / "llava15_7b_shortv.yaml").params.layers)
    mapped: list[int] = []
    for i in paper:
        j = i * num_layers // 32
        if j not in mapped:
            mapped.append(j)
    return mapped[: int(round(len(paper) / 32 * num_layers))]


def method_settings(adapter, names=METHODS) -> list[tuple[str, Any, dict]]:
    """(name, built Method, budget info) for every method at the common budget; ShortV/RedundancyLens have
    no token budget and get explicit layer lists (see the report)."""
    import methods as registry
    from harness.budget import resolve

    L = adapter.num_llm_layers
    n_vis = adapter.visual_tokens_per_image
    vision_start = max(1, adapter.num_vision_layers // 2)
    params = {
        "none": {},
        "random": {},
        "fastv": {},
        "tome": {},
        "ficoco_v": {"start_layer": vision_start},
        "ficoco_l": {"start_layer": min(4, L - 2)},
        "ficoco_vl": {"vision_params": {"start_layer": vision_start}, "llm_params": {"start_layer": min(4, L - 2)}},
        "shortv": {"layers": shortv_layers(L)},
        "redundancylens": {"hollow_layers": list(range(L // 2, L)), "ffn_layers": list(range(L // 2, L)),
                           "window": max(1, round(256 / 576 * n_vis))},
    }
    # the compositions: the same layer-wise settings, then FastV (K=2) whose keep the common budget sets;
    # FastV's scoring layer K-1 = 1 may not be reduced by the layer-wise member (refused otherwise)
    params["shortv_fastv"] = {"members": [
        {"name": "shortv", "params": {"layers": [i for i in params["shortv"]["layers"] if i != 1]}},
        {"name": "fastv", "params": {"K": 2}}]}
    params["redundancylens_fastv"] = {"members": [
        {"name": "redundancylens", "params": {k: ([i for i in v if i != 1] if isinstance(v, list) else v)
                                              for k, v in params["redundancylens"].items()}},
        {"name": "fastv", "params": {"K": 2}}]}
    out = []
    for name in names:
        m = registry.build("compose" if name in COMPOSITIONS else name, params[name])
        m.validate(adapter)
        info: dict = {}
        if name != "none" and m.budget_tokens_param:
            m, info = resolve(m, adapter, {"kind": "tokens", "value": BUDGET_TOKENS})
        out.append((name, m, info))
    return out


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


# ---- parts -----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, spec: Spec, log=None, arch: str | None = None):
        self.spec = spec
        self.arch = arch
        self.log = log or (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
        self._base = None
        #: the time budget of an unattended run (`run_gpu_full`); None: every loop runs its planned rounds
        self.guard: TimeGuard | None = None
        #: Hydra overrides of the `arch` model config (`build_full`)
        self.overrides: tuple[str, ...] = ()
        #: the methods part drops a method whose trial generation fails (reported) instead of failing (GPU run)
        self.tolerate_failures = False

    def _stop(self, what: str, planned: int, share: float = 1.0):
        """The early-stop rule of a timing loop under the time guard (None without one)."""
        return None if self.guard is None else self.guard.rounds(self._what(what), planned, share)

    def _what(self, what: str) -> str:
        return f"{self.arch}: {what}" if self.arch else what

    # shared inputs ----------------------------------------------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            t0 = time.perf_counter()
            self._base = (build_full(self.arch, self.spec, self.overrides) if self.arch
                          else build_model(self.spec))
            self.log(f"model built in {time.perf_counter() - t0:.1f}s")
        return self._base

    @property
    def image_size(self) -> int:
        return bench_image_size(self.base[0].config)

    def messages_prompt(self, processor, question: str, chat_template=None) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        kw = {"chat_template": chat_template} if chat_template else {}
        return processor.apply_chat_template(msgs, add_generation_prompt=True, **kw)

    def encode(self, processor, questions: list[str], images: list) -> dict:
        prompts = [self.messages_prompt(processor, q) for q in questions]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=len(prompts) > 1)
        dtype = getattr(torch, self.spec.dtype)
        return {k: (v.to(self.spec.device, dtype) if torch.is_floating_point(v) else v.to(self.spec.device))
                for k, v in inputs.items()}

    def gen_kwargs(self, processor, n: int) -> dict:
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                    pad_token_id=processor.tokenizer.pad_token_id)

    # overhead --------------------------------------------------------------------------------------------
    def overhead(self) -> dict:
        """Harness path (`load_model` + method none + VTBenchLMM.generate_batch) vs HF directly."""
        import tempfile

        from transformers import AutoModelForImageTextToText, AutoProcessor

        import methods
        from harness.config import compose_config
        from harness.lmms_model import VTBenchLMM
        from harness.models.loading import load_model

        spec = self.spec
        model, processor = self.base
        with tempfile.TemporaryDirectory(prefix="vtbench-bench-") as d:
            model.save_pretrained(d)
            processor.save_pretrained(d)
            cfg = compose_config([f"model.pretrained={d}", f"run.device={spec.device}", f"model.dtype={spec.dtype}"])
            h_model, h_proc, adapter = load_model(cfg.model, spec.device, spec.dtype)
            methods.build("none").apply(h_model, adapter)
            lm = VTBenchLMM(model=h_model, processor=h_proc, adapter=adapter, batch_size=1,
                            chat_template=cfg.model.get("chat_template"), progress=False)
            d_model = AutoModelForImageTextToText.from_pretrained(
                d, dtype=getattr(torch, spec.dtype), attn_implementation="sdpa").to(spec.device).eval()
            d_proc = AutoProcessor.from_pretrained(d)
        question = make_question(spec.text_words)
        image = make_image(0, self.image_size)
        dtype = getattr(torch, spec.dtype)

        def direct_inputs():
            prompt = self.messages_prompt(d_proc, question)
            x = d_proc(images=[image], text=[prompt], return_tensors="pt")
            return {k: (v.to(spec.device, dtype) if torch.is_floating_point(v) else v.to(spec.device))
                    for k, v in x.items()}

        @torch.inference_mode()
        def direct_prefill():
            return d_model(**direct_inputs(), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)

        @torch.inference_mode()
        def direct_generate(n=spec.gen_tokens):
            x = direct_inputs()
            out = d_model.generate(**x, **self.gen_kwargs(d_proc, n))
            return d_proc.tokenizer.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)

        def harness_prefill():
            return lm.generate_batch([question], [[image]], 1)

        def harness_generate():
            return lm.generate_batch([question], [[image]], spec.gen_tokens)

        # same answers through both paths (greedy; the harness does not force a minimum length)
        same_first = harness_prefill()[0] == d_proc.tokenizer.decode(direct_prefill(), skip_special_tokens=True)
        self.log("overhead: prefill")
        pre = interleaved({"direct": direct_prefill, "harness": harness_prefill}, spec.repeats, device=spec.device,
                          log=self.log)
        self.log("overhead: generate")
        gen = interleaved({"direct": direct_generate, "harness": harness_generate}, spec.gen_repeats,
                          device=spec.device, log=self.log)
        n_tokens = int(direct_inputs()["input_ids"].shape[1])
        # the harness stops at EOS like any greedy generate: count its forwards (1 prefill + n-1 decode steps)
        calls = []
        hook = h_model.register_forward_hook(lambda *_: calls.append(1))
        harness_generate()
        hook.remove()
        h_new = len(calls)

        def row(times):
            d, h = med(times["direct"]), med(times["harness"])
            # paired: harness / direct within each round (the two run back to back), then the median over
            # rounds; a slow stretch of a shared machine hits both sides of a pair, not one median
            paired = med(paired_ratios(times["harness"], times["direct"]))
            return {"direct_s": d, "harness_s": h, "ratio_of_medians": h / d, "ratio": paired,
                    "overhead": paired - 1.0, "spread_direct": spread(times["direct"]),
                    "spread_harness": spread(times["harness"]), "times": times}

        out = {"prompt_tokens": n_tokens, "prefill": row(pre), "generate": row(gen), "same_first_token": same_first,
               "harness_generated_tokens": h_new, "gen_tokens": spec.gen_tokens,
               "target": OVERHEAD_TARGET}
        out["prefill_overhead_ok"] = out["prefill"]["overhead"] < OVERHEAD_TARGET
        del lm, h_model, d_model
        gc.collect()
        return out

    # methods ---------------------------------------------------------------------------------------------
    def _patched(self, names=METHODS) -> list[tuple[str, Any, dict, Any]]:
        from harness.models import get_adapter

        base, _ = self.base
        out = []
        for name, method, info in method_settings(get_adapter(base), names):
            m = share_weights_copy(base)
            method.apply(m, get_adapter(m))
            out.append((name, method, info, m))
        return out

    def _trial(self, patched, inputs, processor) -> tuple[list, dict[str, str]]:
        """One 2-token generation per patched model (prefill + a decode step); the ones that raise are
        dropped and returned with their error line. `none` failing is not survivable: it raises."""
        kept, failed = [], {}
        for item in patched:
            try:
                with torch.inference_mode():
                    item[3].generate(**inputs, **self.gen_kwargs(processor, 2))
                kept.append(item)
            except Exception as e:  # noqa: BLE001 - reported in the methods part
                if item[0] == "none":
                    raise
                failed[item[0]] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                self.log(f"{item[0]}: failed its trial generation, dropped: {failed[item[0]]}")
        gc.collect()
        if str(self.spec.device).startswith("cuda"):
            torch.cuda.empty_cache()
        return kept, failed

    def methods(self, names=METHODS) -> dict:
        from transformers import DynamicCache

        from harness.efficiency import flops as F

        spec = self.spec
        _, processor = self.base
        inputs = self.encode(processor, [make_question(spec.text_words)], [make_image(0, self.image_size)])
        config = self.base[0].config
        (layout,) = F.layouts_from_inputs(config, inputs)
        patched = self._patched(names)
        gk = self.gen_kwargs(processor, spec.gen_tokens)
        failed: dict[str, str] = {}
        if self.tolerate_failures:
            patched, failed = self._trial(patched, inputs, processor)

        def prefill_fn(m):
            @torch.inference_mode()
            def f():
                return m(**inputs, use_cache=True, logits_to_keep=1)
            return f

        def gen_fn(m):
            @torch.inference_mode()
            def f():
                return m.generate(**inputs, **gk)
            return f

        rows = []
        for name, method, info, m in patched:
            t0 = time.perf_counter()
            pre = F.count_prefill(m, inputs, counter=spec.counter)
            ana = F.analytic_prefill(config, layout, None if name == "none" else method)
            # the per-layer KV-cache lengths a real prefill leaves (methods may shrink some layers' cache);
            # decode FLOPs are analytic from them (counted == analytic for decode is tested in tests/efficiency)
            cache = DynamicCache(config=config.text_config)
            with torch.inference_mode():
                m(**inputs, use_cache=True, past_key_values=cache, logits_to_keep=1)
            context, kv_lengths = int(cache.get_seq_length()), F.cache_lengths(cache)
            kv_bytes = kv_cache_bytes(cache)
            del cache
            # generate(n) = 1 prefill + (n - 1) decode steps; step i attends to the cache + i new tokens
            steps = []
            for i in range(spec.gen_tokens - 1):
                kv = [n + i for n in kv_lengths] if kv_lengths else None
                steps.append(sum(F.analytic_decode(config, context + i, kv_lengths=kv).values()))
            rows.append({
                "method": name, "description": method.describe(), "budget": info,
                "prefill_flops": pre.total, "prefill_flops_by_component": pre.flops,
                "prefill_flops_analytic": int(sum(ana.values())),
                "counted_equals_analytic": pre.total == int(sum(ana.values())),
                "decode_flops_first": steps[0] if steps else 0, "decode_context": context,
                "kv_lengths": kv_lengths, "kv_cache_bytes": kv_bytes,
                "generate_flops": pre.total + sum(steps), "unsupported_ops": pre.unsupported_ops,
                "count_seconds": round(time.perf_counter() - t0, 2),
            })
            self.log(f"counted {name}: prefill {pre.total / 1e9:.2f} GFLOPs ({rows[-1]['count_seconds']}s)")
        self.log("methods: prefill")
        # the counting pass and the cache pass above already warmed every model up
        pre_mem: dict | None = {} if spec.memory else None
        gen_mem: dict | None = {} if spec.memory else None
        pre_t = interleaved({n: prefill_fn(m) for n, _, _, m in patched}, spec.repeats, warmup=0,
                            device=spec.device, log=self.log, memory=pre_mem,
                            stop=self._stop("methods: prefill", spec.repeats, 0.3))
        self.log("methods: generate")
        gen_t = interleaved({n: gen_fn(m) for n, _, _, m in patched}, spec.gen_repeats, warmup=0,
                            device=spec.device, log=self.log, memory=gen_mem,
                            stop=self._stop("methods: generate", spec.gen_repeats, 0.6))
        ref = rows[0]
        assert ref["method"] == "none"
        t_none, g_none = med(pre_t["none"]), med(gen_t["none"])
        for r in rows:
            n = r["method"]
            r["prefill_s"], r["generate_s"] = med(pre_t[n]), med(gen_t[n])
            r["prefill_spread"], r["generate_spread"] = spread(pre_t[n]), spread(gen_t[n])
            r["prefill_times"], r["generate_times"] = pre_t[n], gen_t[n]
            # measured speed-up = median over rounds of t(none) / t(method) in the same round (paired, as for
            # the harness overhead): a slow stretch of the shared machine hits both sides of a pair, while a
            # ratio of the two medians carries any drift across the run (kept beside it)
            per_round = paired_ratios(pre_t["none"], pre_t[n])
            r["prefill_measured"] = med(per_round)
            r["prefill_measured_rom"] = t_none / r["prefill_s"]
            r["prefill_measured_q"] = quartiles(per_round)
            r["prefill_predicted"] = ref["prefill_flops"] / r["prefill_flops"]
            r["prefill_ratio"] = r["prefill_measured"] / r["prefill_predicted"]
            r["prefill_ratio_rom"] = r["prefill_measured_rom"] / r["prefill_predicted"]
            r["prefill_ratio_q"] = [q / r["prefill_predicted"] for q in r["prefill_measured_q"]]
            r["generate_measured"] = med(paired_ratios(gen_t["none"], gen_t[n]))
            r["generate_predicted"] = ref["generate_flops"] / r["generate_flops"]
            r["generate_ratio"] = r["generate_measured"] / r["generate_predicted"]
            r["prefill_gflops_per_s"] = r["prefill_flops"] / r["prefill_s"] / 1e9
            r["target"] = TARGETS.get(n)
            r["target_met"] = None if r["target"] is None else bool(r["prefill_ratio"] >= r["target"])
            if spec.memory:  # peak memory growth during the method's first timed call (CUDA: max allocated)
                r["prefill_peak_mem_bytes"], r["generate_peak_mem_bytes"] = pre_mem[n], gen_mem[n]
        misses = [r["method"] for r in rows if r["target_met"] is False]
        profiles = {}
        # a profile costs about a dozen prefills per method (profiler, component hooks, own-work timing)
        if misses and (self.guard is None or self.guard.allows(
                self._what(f"methods: profiles of {', '.join(misses)} (under target)"),
                12 * (len(misses) + 1) * max(med(v) for v in pre_t.values()))):
            models = {n: m for n, _, _, m in patched}
            for n in ["none"] + misses:
                self.log(f"profiling {n}" + (" (missed its target)" if n != "none" else ""))
                profiles[n] = profile_prefill(prefill_fn(models[n]))
                profiles[n]["components_s"] = component_times(models[n], prefill_fn(models[n]))
                if n != "none":
                    profiles[n]["own_work"] = method_work_times(models[n], prefill_fn(models[n]))
        del patched
        gc.collect()
        return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "layout": layout.__dict__,
                "gen_tokens": spec.gen_tokens, "rows": rows, "profiles": profiles, "failed": failed,
                "rounds": {"prefill": [len(pre_t["none"]), spec.repeats],
                           "generate": [len(gen_t["none"]), spec.gen_repeats]}}

    # scores ----------------------------------------------------------------------------------------------
    def scores(self, names=("fastv", "ficoco_l")) -> dict:
        from harness.models import get_adapter

        spec = self.spec
        base, processor = self.base
        inputs = self.encode(processor, [make_question(spec.text_words)], [make_image(0, self.image_size)])
        n = int(inputs["input_ids"].shape[1])
        out = {"prompt_tokens": n, "methods": {}}
        settings = {s[0]: s for s in method_settings(get_adapter(base), ("none",) + tuple(names))}
        none_m = share_weights_copy(base)
        for name in names:
            _, method, _, = settings[name]
            ours = share_weights_copy(base)
            method.apply(ours, get_adapter(ours))
            layers = scoring_layers(method, get_adapter(ours).num_llm_layers)
            ref_layer = share_weights_copy(base)
            method.apply(ref_layer, get_adapter(ref_layer))
            keep_eager_weights(ref_layer, layers)
            ref_all = share_weights_copy(base)
            ref_all.set_attn_implementation("eager")
            method.apply(ref_all, get_adapter(ref_all))
            variants = {"none (sdpa)": (none_m, {}), "ours (sdpa + rows)": (ours, {}),
                        "eager on scoring layers": (ref_layer, {}),
                        "eager everywhere + output_attentions": (ref_all, {"output_attentions": True})}
            fns = {}
            weights_seen: dict[int, int] = {}
            logits: dict[str, torch.Tensor] = {}
            for label, (m, extra) in variants.items():
                def f(m=m, extra=extra, label=label):
                    with torch.inference_mode():
                        o = m(**inputs, use_cache=True, logits_to_keep=1, **extra)
                        logits[label] = o.logits[:, -1].float()
                        kept = getattr(m, "_vtbench_bench_weights", None)
                        if kept is not None:
                            weights_seen[id(m)] = len(kept)
                            kept.clear()
                        return o
                fns[label] = f
            error = None
            try:
                with torch.inference_mode():
                    check = ref_all(**inputs, use_cache=True, logits_to_keep=1, output_attentions=True)
                maps = [a for a in (check.attentions or ()) if a is not None]
                n_att = len(maps)
                returned_bytes = sum(a.numel() * a.element_size() for a in maps)
                del check, maps
            except Exception as e:  # noqa: BLE001 - reported, the variant is dropped
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                fns.pop("eager everywhere + output_attentions")
                n_att, returned_bytes = 0, None
            self.log(f"scores: {name}")
            mem: dict[str, int] = {}
            times = interleaved(fns, spec.gen_repeats, device=spec.device, log=self.log, memory=mem,
                                stop=self._stop(f"scores: {name}", spec.gen_repeats, 0.5))
            t_ours = med(times["ours (sdpa + rows)"])
            ours_logits = logits["ours (sdpa + rows)"]
            diffs = {k: float((v - ours_logits).abs().max()) for k, v in logits.items() if k != "none (sdpa)"}
            H = base.config.text_config.num_attention_heads
            L = base.config.text_config.num_hidden_layers
            elem = torch.finfo(getattr(torch, spec.dtype)).bits // 8
            out["methods"][name] = {
                "description": method.describe(), "scoring_layers": layers,
                "variants": {k: {"s": med(v), "spread": spread(v), "vs_ours": med(v) / t_ours,
                                 "max_abs_logit_diff_vs_ours": diffs.get(k),
                                 "peak_mem_delta_bytes": mem[k], "times": v} for k, v in times.items()},
                "attention_maps_returned": n_att, "error_output_attentions": error,
                "weights_kept_scoring_layers": weights_seen.get(id(ref_layer), 0),
                "one_layer_attention_bytes": H * n * n * elem, "all_layers_attention_bytes": L * H * n * n * elem,
                "returned_attention_bytes": returned_bytes,
            }
            del ours, ref_layer, ref_all
            gc.collect()
        return out

    # batch -----------------------------------------------------------------------------------------------
    def batch(self, names=("none",)) -> dict:
        from harness.lmms_model import VTBenchLMM
        from harness.models import get_adapter

        spec = self.spec
        _, processor = self.base
        B = spec.batch
        questions = [make_question(spec.text_words // 2 + 3 * i, seed=i) for i in range(B)]
        images = [[make_image(100 + i, self.image_size)] for i in range(B)]
        out = {"batch": B, "new_tokens": spec.batch_new_tokens, "methods": {}}
        for name, _, _, m in self._patched(names):
            lm = VTBenchLMM(model=m, processor=processor, adapter=get_adapter(m), batch_size=B, progress=False)
            lengths = [int(self.encode(processor, [q], [im[0]])["input_ids"].shape[1])
                       for q, im in zip(questions, images)]

            def one_by_one():
                return [lm.generate_batch([q], [im], spec.batch_new_tokens)[0] for q, im in zip(questions, images)]

            def batched():
                return lm.generate_batch(questions, images, spec.batch_new_tokens)

            self.log(f"batch: {name}")
            outs: dict = {}
            rounds = max(1, spec.gen_repeats // 2)
            times = interleaved({"batch 1": one_by_one, f"batch {B}": batched}, rounds,
                                warmup=0, device=spec.device, log=self.log, outputs=outs,
                                stop=self._stop(f"batch: {name}", rounds, 0.5))
            p1, pB = outs["batch 1"], outs[f"batch {B}"]
            t1, tB = med(times["batch 1"]), med(times[f"batch {B}"])
            out["methods"][name] = {
                "prompt_lengths": lengths, "batch1_s": t1, "batchB_s": tB, "throughput_ratio": t1 / tB,
                "same_predictions": p1 == pB, "n_different": sum(a != b for a, b in zip(p1, pB)),
                "times": times,
            }
            del lm, m
            gc.collect()
        return out

    # flops -----------------------------------------------------------------------------------------------
    def _timed(self, cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
        """(wall s, user + system CPU s, result) of one subprocess."""
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), p

    def flops(self, names=METHODS, model: str = "llava15_13b", repeats: int = 3) -> dict:
        """Wall time of `vtbench-flops` per method (median of `repeats` runs), beside the import floor:
        the time of importing torch, transformers and the LLaVA / CLIP / Llama modeling code, which every
        count pays before any code of ours runs. The runs go round-robin (every method, then the floor,
        once per round, the order rotating), so that a slow stretch of the machine spreads over all of
        them instead of falling on one method's runs."""
        exe = Path(sys.executable).with_name("vtbench-flops")
        cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.flops_cli"]
        cmds = {name: cmd0 + [f"model={model}", f"method={name}"] + flops_cli_params(name) + ["format=json"]
                for name in names}
        cmds[FLOOR] = [sys.executable, "-c", IMPORT_FLOOR]
        order = list(cmds)
        runs: dict[str, list] = {n: [] for n in order}
        for r in range(repeats):
            k = r % len(order)
            for n in order[k:] + order[:k]:
                runs[n].append(self._timed(cmds[n]))
            self.log(f"flops round {r + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1][0]:.1f}s" for n in order))
        floor = sorted(x[0] for x in runs.pop(FLOOR))
        rows = []
        for name in names:
            args = cmds[name][len(cmd0):-1]
            rs = sorted(runs[name], key=lambda x: x[0])
            wall, cpu_s, p = rs[len(rs) // 2]
            row = {"method": name, "args": " ".join(args), "seconds": round(wall, 2), "cpu_seconds": round(cpu_s, 2),
                   "seconds_all": [round(x[0], 2) for x in runs[name]], "rc": max(x[2].returncode for x in rs)}
            if p.returncode == 0:
                r = json.loads(p.stdout)
                row.update({"prefill_flops": r["prefill"]["total"]["counted"] or r["prefill"]["total"]["analytic"],
                            "source": r["prefill"]["source"], "match": r["prefill"]["total"]["match"],
                            "inner_seconds": r.get("seconds"), "timing": r.get("timing", {}),
                            "notes": r.get("notes", [])})
            else:
                row["error"] = (p.stderr.strip().splitlines() or [""])[-1]
            rows.append(row)
            self.log(f"flops: {name} {wall:.1f}s (runs {row['seconds_all']}) rc={row['rc']}")
        dense = next((r.get("prefill_flops") for r in rows if r["method"] == "none"), None)
        for r in rows:
            if dense and r.get("prefill_flops"):
                r["predicted_speedup"] = dense / r["prefill_flops"]
        return {"model": model, "rows": rows, "limit_s": 10.0, "repeats": repeats,
                "import_floor_s": round(floor[len(floor) // 2], 2), "import_floor_all": [round(x, 2) for x in floor],
                "import_floor_cmd": IMPORT_FLOOR,
                "all_under_limit": all(r["seconds"] < 10.0 and r["rc"] == 0 for r in rows),
                # user + system CPU time of the command: its wall time on an otherwise idle machine
                "all_cpu_under_limit": all(r.get("cpu_seconds", 1e9) < 10.0 and r["rc"] == 0 for r in rows)}


FLOOR = "(import floor)"
#: what every `vtbench-flops` run imports before any vtbench code runs (the floor of its wall time)
IMPORT_FLOOR = ("import torch, transformers; from transformers.models.llava import modeling_llava; "
                "from transformers.models.clip import modeling_clip; from transformers.models.llama import modeling_llama; "
                "import os; os._exit(0)")  # leaves as vtbench-flops does, without the interpreter's teardown


def flops_cli_params(name: str, n_vis: int = 576, num_layers: int = 40) -> list[str]:
    """`vtbench-flops` overrides for the common budget on a 13B-size config (192 of 576 tokens)."""
    k = int(round(BUDGET_TOKENS * n_vis))
    p = {
        "none": [], "random": [f"method.params.keep={k}"], "fastv": [f"method.params.keep={k}"],
        "tome": [f"method.params.tokens={k}"], "ficoco_v": [f"method.params.tokens={k}"],
        "ficoco_l": [f"method.params.final_tokens={k}"], "ficoco_vl": [f"method.params.tokens={k}"],
        "shortv": [],  # the paper's 13B list (conf/model_method/llava15_13b_shortv.yaml)
        "redundancylens": [
            "method.params.hollow_layers=[" + ",".join(map(str, range(num_layers // 2, num_layers))) + "]",
            "method.params.ffn_layers=[" + ",".join(map(str, range(num_layers // 2, num_layers))) + "]",
        ],
    }
    return p[name]


def scoring_layers(method, num_layers: int) -> list[int]:
    """Decoder layers whose attention the method scores from (the reference code materialises their
    attention weights)."""
    if method.name == "fastv":
        return [method.K - 1]
    if method.name == "ficoco_l":
        return list(method.merge_layers(num_layers))
    return []


def keep_eager_weights(model, layers: list[int]) -> None:
    """Reference-style scoring on `layers`: their attention runs eagerly and its weights [B, H, n, n] are
    kept until the forward ends (the released code reads scores from them); other layers stay on SDPA."""
    from harness.models import get_adapter

    adapter = get_adapter(model)
    store: list = []
    model._vtbench_bench_weights = store
    for i in layers:
        attn = adapter.llm_layers[i].self_attn
        cfg = attn.config

        def pre(_m, args, kwargs, cfg=cfg):
            _m._bench_saved_impl = cfg._attn_implementation
            cfg._attn_implementation = "eager"
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _additive_mask(kwargs.get("attention_mask"), args, kwargs)
            return args, kwargs

        def post(_m, _a, out, cfg=cfg):
            cfg._attn_implementation = _m._bench_saved_impl
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                store.append(out[1])

        attn.register_forward_pre_hook(pre, with_kwargs=True)
        attn.register_forward_hook(post)


def _additive_mask(mask, args, kwargs):
    """The SDPA-style mask of a layer (None = causal, or boolean) as the additive float mask eager attention
    takes, so the eager scoring layer computes the same attention (prefill with an empty cache)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    hs = kwargs.get("hidden_states", args[0] if args else None)
    dtype = hs.dtype
    if mask is None:
        n = hs.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=hs.device).tril()[None, None]
    neg = torch.finfo(dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, neg)


def method_work_times(model, fn: Callable[[], Any], repeats: int = 3) -> dict[str, float] | None:
    """Seconds of `fn()` spent in an in-LLM method's own work -- the reduction plan's scoring and
    merging calls (`before_layer`, `after_attention`: attention rows, softmax, top-k, quantiles,
    weighted merges) -- and in total (the bench's clock, median over `repeats`). None when the
    model has no LLM reducer."""
    from methods._shared.llm_reduce import get_reducer

    red = get_reducer(model)
    if red is None:
        return None
    plan = red.plan
    acc = [0.0]
    originals = {n: getattr(plan, n) for n in ("before_layer", "after_attention")}

    def timed(f):
        def g(*a, **k):
            t0 = CLOCK[0]()
            try:
                return f(*a, **k)
            finally:
                acc[0] += CLOCK[0]() - t0
        return g

    own, totals = [], []
    for n, f in originals.items():
        setattr(plan, n, timed(f))
    try:
        for _ in range(repeats):
            acc[0] = 0.0
            t0 = CLOCK[0]()
            fn()
            totals.append(CLOCK[0]() - t0)
            own.append(acc[0])
    finally:
        for n in originals:
            delattr(plan, n)  # back to the class methods
    return {"own_s": med(own), "total_s": med(totals)}


def component_times(model, fn: Callable[[], Any], repeats: int = 1) -> dict[str, float]:
    """Seconds spent in the vision tower, projector, language model and lm_head during `fn()` (forward
    hooks, the bench's clock; median over `repeats` calls)."""
    from harness.models import get_adapter

    ad = get_adapter(model)
    mods = {"vision": ad.vision_tower, "projector": ad.projector, "llm": ad.language_model, "lm_head": ad.lm_head}
    acc: dict[str, list[float]] = {c: [] for c in mods}
    cur: dict[str, float] = {}
    handles = []
    for c, mod in mods.items():
        def pre(_m, _i, c=c):
            cur[c] = CLOCK[0]()

        def post(_m, _i, _o, c=c):
            acc[c][-1] += CLOCK[0]() - cur.pop(c)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    totals = []
    try:
        for _ in range(repeats):
            for c in acc:
                acc[c].append(0.0)
            t0 = CLOCK[0]()
            fn()
            totals.append(CLOCK[0]() - t0)
    finally:
        for h in handles:
            h.remove()
    out = {c: med(v) for c, v in acc.items()}
    out["total"] = med(totals)
    out["outside"] = out["total"] - sum(out[c] for c in mods)
    return out


def profile_prefill(fn: Callable[[], Any], top: int = 8) -> dict:
    """One profiled call: self CPU time per operator, grouped into matmul / attention / gather-index-copy /
    other."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.key_averages()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in ev), key=lambda x: -x[1])
    groups = {"matmul": 0.0, "attention": 0.0, "gather/index/copy": 0.0, "other": 0.0}
    for k, ms, _ in ops:
        g = ("matmul" if k in MATMUL_OPS else "attention" if k in ATTN_OPS else
             "gather/index/copy" if k in GATHER_OPS else "other")
        groups[g] += ms
    return {"total_ms": sum(groups.values()), "groups_ms": groups,
            "top": [{"op": k, "self_ms": round(ms, 2), "calls": c} for k, ms, c in ops[:top]]}


# ---- report --------------------------------------------------------------------------------------------
#: how the methods part counted FLOPs (`Spec.counter`), for the report
COUNTERS = {None: "fvcore", "fvcore": "fvcore",
            "flop_counter_mode": "torch's FLOP formulas during a real forward (flop_counter_mode)"}


def _f(x, nd=2, pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if pct:
        return f"{100 * x:+.{nd}f} %"
    return f"{x:.{nd}f}"


def _q(q) -> str:
    return "-" if not q else f"{q[0]:.2f}-{q[1]:.2f}"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def render(res: dict) -> str:
    m = res["meta"]
    L = []
    L.append(f"# vtbench performance benchmark — {m['machine']}")
    L.append("")
    L.append(f"Regenerate: `{m['command']}` (`{m.get('make', 'make bench')}`). Ratios from one run; medians of interleaved "
             f"repetitions (the order of the contenders rotates every round). {m['note']}")
    L.append("")
    if m["device"] == "cpu" and not m.get("time_guard"):
        L.append("This is the CPU part of the benchmark. The GPU part (the full LLaVA-1.5-7B and LLaVA-NeXT-7B "
                 "architectures with random fp16 weights, every method) is `make bench-gpu` (`vtbench-bench "
                 "--gpu-full`) on a machine with a CUDA GPU (it writes its own reports, named after the GPU and the "
                 "architecture); no GPU was available to this run.")
        L.append("")
    L.append("| | |\n|---|---|")
    for k in ("date", "cpu", "device", "logical_cpus", "torch_threads", "clock", "dtype", "torch", "transformers",
              "git", "loadavg_start", "loadavg_end", "wall_seconds", "model", "repeats"):
        L.append(f"| {k} | {m.get(k)} |")
    L.append("")
    if m.get("time_guard"):
        tg = m["time_guard"]
        L.append(f"Unattended GPU run (`--gpu-full`): this architecture's share of the run's {tg['budget_s']:.0f} s "
                 f"time budget was {tg['share_s']:.0f} s; timing loops stop adding rounds (after at least one) and "
                 "whole steps are skipped when the next one would not fit. "
                 + ("Cut short by the budget: " + "; ".join(tg["events"]) + "." if tg["events"]
                    else "Nothing was cut short: every planned round ran."))
        L.append("")
    L.append("Load average is the 1/5/15-minute system load: a value above the thread count means other "
             "processes shared the CPU, which widens the spreads below (spread = (max-min)/median of the "
             "repetitions).")
    busy = [x for x in (m.get("loadavg_start") or [])[:1] + (m.get("loadavg_end") or [])[:1]]
    if m["device"] == "cpu" and busy and max(busy) > (m.get("logical_cpus") or 1) + 0.5 and "CPU" not in m["clock"]:
        L.append("")
        L.append(f"**Warning: the CPU was shared during this run (1-minute load {max(busy)} on "
                 f"{m.get('logical_cpus')} logical CPUs). With several torch threads, an oversubscribed CPU stalls "
                 "every parallel region, so times and ratios below are unreliable: rerun on an idle machine.**")
    L.append("")
    if "overhead" in res:
        o = res["overhead"]
        L.append("## Harness overhead (method `none`)")
        L.append("")
        L.append(f"Prompt: {o['prompt_tokens']} tokens. Direct = processor + `model(...)` forward (prefill) or "
                 f"`model.generate` ({o['gen_tokens']} tokens) on `from_pretrained` of the same checkpoint; harness = "
                 "`load_model` + `methods.build('none').apply` + `VTBenchLMM.generate_batch` (chat prompt, processor, "
                 "generate with logits, finiteness check, decoding), 1 new token for prefill.")
        L.append("")
        L.append("| phase | direct (s) | harness (s) | median ratio / ratio of medians | overhead | "
                 "spread direct / harness |")
        L.append("|---|---|---|---|---|---|")
        for ph in ("prefill", "generate"):
            r = o[ph]
            L.append(f"| {ph} | {r['direct_s']:.3f} | {r['harness_s']:.3f} | {r['ratio']:.4f} / "
                     f"{r.get('ratio_of_medians', r['ratio']):.4f} | "
                     f"{_f(r['overhead'], 2, pct=True)} | {_f(r['spread_direct'])} / {_f(r['spread_harness'])} |")
        L.append("")
        L.append("Overhead = the median over rounds of harness / direct in the same round (the two run back to back, "
                 "so a slow stretch of the machine hits both); the ratio of the two medians is beside it. The target "
                 "(3 %) is well inside the run-to-run spread of single timings on a shared CPU, which only the paired "
                 "ratio resolves.")
        L.append("")
        L.append(f"Target: prefill overhead < {100 * o['target']:.0f} % — **{'met' if o['prefill_overhead_ok'] else 'MISSED'}**. "
                 f"Same first token through both paths: {_f(o['same_first_token'])}. The harness generated "
                 f"{o['harness_generated_tokens']} of {o['gen_tokens']} tokens (it stops at EOS like any greedy `generate`; "
                 f"the direct call is forced to {o['gen_tokens']}): fewer means the generate row understates the overhead.")
        L.append("")
    if "methods" in res:
        mm = res["methods"]
        lay = mm["layout"]
        L.append("## Methods at a common budget (batch 1)")
        L.append("")
        L.append(f"Prompt: {mm['prompt_tokens']} tokens ({lay['before']} text + {lay['visual']} visual + "
                 f"{lay['after']} text). Budget: {round(BUDGET_TOKENS * lay['visual'])} of {lay['visual']} visual "
                 "tokens reaching the LLM (`budget.kind=tokens budget.value=0.3333`, harness/budget.py) for the "
                 "token methods; ShortV and RedundancyLens have no token budget (parameters below). "
                 "measured = the median over rounds of t(none) / t(method) in the same round (paired, so that a slow "
                 "stretch of the shared machine hits both sides; the ratio of the two medians is beside it, and "
                 "'ratio q1-q3' is the interquartile range of the per-round ratios); predicted = counted FLOPs(none) / FLOPs(method) "
                 f"({COUNTERS.get(m.get('counter'), COUNTERS[None])} on the patched model, FLOPs = 2 x MACs); "
                 "ratio = measured / predicted. Generation: "
                 f"{mm['gen_tokens']} new tokens = 1 prefill + {mm['gen_tokens'] - 1} decode steps, predicted from the "
                 "counted prefill + the analytic decode steps over the per-layer KV-cache lengths a real prefill "
                 "left (counted == analytic for decode is covered by tests/efficiency). GFLOP/s = counted prefill "
                 "FLOPs / median prefill time.")
        L.append("")
        rnd = next((r for r in mm["rows"] if r["method"] == "random"), None)
        L.append("| method | prefill GFLOPs | t prefill (s) | spread | measured | predicted | ratio | target | "
                 "ratio q1-q3 | ratio of medians | ratio / random's | gen t (s) | gen measured | gen predicted | "
                 "gen ratio | GFLOP/s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mm["rows"]:
            tgt = "-" if r["target"] is None else f"≥ {r['target']:.2f} {'met' if r['target_met'] else '**MISSED**'}"
            vs = f"{r['prefill_ratio'] / rnd['prefill_ratio']:.2f}" if rnd and r["method"] not in ("none", "random") else "-"
            L.append(f"| {r['method']} | {r['prefill_flops'] / 1e9:.4g} | {r['prefill_s']:.3f} | "
                     f"{r['prefill_spread']:.2f} | {r['prefill_measured']:.2f} | {r['prefill_predicted']:.2f} | "
                     f"{r['prefill_ratio']:.2f} | {tgt} | {_q(r.get('prefill_ratio_q'))} | "
                     f"{_f(r.get('prefill_ratio_rom'))} | {vs} | {r['generate_s']:.3f} | {r['generate_measured']:.2f} | "
                     f"{r['generate_predicted']:.2f} | {r['generate_ratio']:.2f} | {r['prefill_gflops_per_s']:.1f} |")
        L.append("")
        for name, err in (mm.get("failed") or {}).items():
            L.append(f"**{name} FAILED** its trial generation on this device and is not in the table: {err}")
            L.append("")
        rounds = mm.get("rounds")
        if rounds and any(d < p for d, p in rounds.values()):
            L.append("Rounds run / planned: " + ", ".join(f"{k} {d}/{p}" for k, (d, p) in rounds.items())
                     + " (the time budget stopped the loop early).")
            L.append("")
        if any(r.get("kv_cache_bytes") is not None for r in mm["rows"]):
            L.append("Memory: KV cache = bytes of the keys and values a prefill leaves in the cache (every layer; "
                     "the generate steps add the new tokens); peak growth = peak memory during the method's first "
                     "timed call minus the memory in use before it (CUDA: `max_memory_allocated`; CPU: sampled RSS), "
                     "'-' where not recorded.")
            L.append("")
            L.append("| method | KV cache | cached tokens per layer (min-max) | prefill peak growth | "
                     "generate peak growth |")
            L.append("|---|---|---|---|---|")
            for r in mm["rows"]:
                kv = r.get("kv_lengths") or [0]
                L.append(f"| {r['method']} | {_mb(r.get('kv_cache_bytes'))} | {min(kv)}-{max(kv)} | "
                         f"{_mb(r.get('prefill_peak_mem_bytes'))} | {_mb(r.get('generate_peak_mem_bytes'))} |")
            L.append("")
        if rnd:
            L.append(f"`random` drops tokens at the LLM input with no scoring and no bookkeeping after it: its ratio "
                     f"({rnd['prefill_ratio']:.2f}) is the structural part of the gap on this machine, the costs that do "
                     "not shrink with the token count (per-layer weight streaming at batch 1, kernel and Python "
                     "dispatch, embedding and lm_head) plus the lower GFLOP/s of shorter matrices. 'ratio / random's' "
                     "is what is left for each method's own work (scoring, merging, gathers): 1.00 means none.")
            L.append("")
        L.append("Parameters (method.describe()) and counting checks (prefill counted == analytic):")
        L.append("")
        for r in mm["rows"]:
            L.append(f"- `{r['description']}` — counted == analytic: {_f(r['counted_equals_analytic'])}"
                     + (f"; unsupported ops: {r['unsupported_ops']}" if r["unsupported_ops"] else ""))
        L.append("")
        L.append("ShortV: the paper's LLaVA-1.5-7B layer list mapped to this model's depth (i -> floor(i·L/32), "
                 "duplicates dropped), first round(19/32·L) layers (a random model cannot be calibrated "
                 "meaningfully). RedundancyLens: Hollow Attention and the probe-activated FFN on the second half "
                 "of the layers (about half, as the paper says; the choice does not change FLOPs), window scaled "
                 "as 256/576 of the visual tokens. FiCoCo-V/VL start merging at half the CLIP depth "
                 "(the paper: 12 of 24).")
        if any(r["method"] in COMPOSITIONS for r in mm["rows"]):
            L.append("Compositions (methods/compose.py): the ShortV / RedundancyLens layers above without FastV's "
                     "scoring layer 1, then FastV (K=2) whose keep the common budget sets.")
        L.append("")
        if mm["profiles"]:
            L.append("### Profile of the methods under target")
            L.append("")
            L.append("One prefill under torch.profiler per method beside one of `none`; self CPU time by operator "
                     "class (matmul = linear/mm/bmm/conv; attention = SDPA/softmax; gather/index/copy = the "
                     "bookkeeping of reductions: index, gather, scatter, cat, sort/topk, copies).")
            L.append("")
            L.append("| method | total ms | matmul | attention | gather/index/copy | other | top operators (self ms) |")
            L.append("|---|---|---|---|---|---|---|")
            for name, p in mm["profiles"].items():
                g = p["groups_ms"]
                top = ", ".join(f"{t['op']} {t['self_ms']:.0f}" for t in p["top"][:5])
                L.append(f"| {name} | {p['total_ms']:.0f} | {g['matmul']:.0f} | {g['attention']:.0f} | "
                         f"{g['gather/index/copy']:.0f} | {g['other']:.0f} | {top} |")
            L.append("")
            L.append(explain_misses(mm))
            L.append("")
    if "scores" in res:
        s = res["scores"]
        L.append("## Attention scores: SDPA + rows (ours) vs materialised attention weights (reference style)")
        L.append("")
        L.append(f"Prompt: {s['prompt_tokens']} tokens, one prefill. 'eager on scoring layers': the method's "
                 "scoring layers run eager attention and keep their [B, H, n, n] weights (the released code reads "
                 "scores from them; our row computation still runs, H·n·d MACs, negligible); 'eager everywhere + "
                 "output_attentions': the whole model on eager attention returning every layer's weights, as a "
                 "model loaded with attn_implementation='eager' and called with output_attentions=True does. "
                 "Peak memory: sampled RSS growth during the first (warm-up) prefill of each variant (CPU; the allocator "
                 "may reuse memory freed earlier, so small values are lower bounds) or max allocated (CUDA).")
        L.append("")
        for name, d in s["methods"].items():
            L.append(f"**{name}** (`{d['description']}`; scoring layers {d['scoring_layers']}, eager weights kept "
                     f"from {d['weights_kept_scoring_layers']} of them; {d['attention_maps_returned']} maps returned with "
                     f"output_attentions; one layer's "
                     f"weights {_mb(d['one_layer_attention_bytes'])}, all layers at full length "
                     f"{_mb(d['all_layers_attention_bytes'])}, returned by output_attentions on the reduced model "
                     f"{_mb(d.get('returned_attention_bytes'))})")
            L.append("")
            L.append("| variant | prefill (s) | vs ours | spread | peak memory growth | max logit diff vs ours |")
            L.append("|---|---|---|---|---|---|")
            for k, v in d["variants"].items():
                diff = v.get("max_abs_logit_diff_vs_ours")
                L.append(f"| {k} | {v['s']:.3f} | {v['vs_ours']:.3f} | {v['spread']:.2f} | "
                         f"{_mb(v['peak_mem_delta_bytes'])} | {'-' if diff is None else f'{diff:.1e}'} |")
            if d["error_output_attentions"]:
                L.append("")
                L.append(f"output_attentions=True failed on the patched eager model: {d['error_output_attentions']}")
            L.append("")
    if "batch" in res:
        b = res["batch"]
        L.append(f"## Batched evaluation (lmms-eval wrapper, left padding, batch {b['batch']} vs 1)")
        L.append("")
        L.append(f"{b['batch']} prompts of different lengths, {b['new_tokens']} new tokens each, through "
                 "`VTBenchLMM.generate_batch` (greedy). Throughput ratio = time of the batch-1 calls / time of one "
                 "batched call. The equality of predictions at batch 8 and 1 for every method is also a test "
                 "(tests/test_batched_eval.py, through `run_cell`).")
        L.append("")
        L.append("| method | prompt lengths | batch 1 (s) | batched (s) | throughput ratio | same predictions |")
        L.append("|---|---|---|---|---|---|")
        for name, d in b["methods"].items():
            L.append(f"| {name} | {min(d['prompt_lengths'])}-{max(d['prompt_lengths'])} | {d['batch1_s']:.3f} | "
                     f"{d['batchB_s']:.3f} | {d['throughput_ratio']:.2f} | "
                     f"{_f(d['same_predictions'])}{'' if d['same_predictions'] else ' (' + str(d['n_different']) + ' differ)'} |")
        L.append("")
    if "flops" in res:
        fl = res["flops"]
        L.append(f"## Counting speed: `vtbench-flops model={fl['model']}` (subprocess wall time)")
        L.append("")
        L.append(f"Median of {fl.get('repeats', 1)} runs per method, round-robin (each round runs every method "
                 "and the import floor once, the order rotating, so a slow stretch of the machine does not fall "
                 "on one method's runs); this part runs first, before the timing parts load the machine. "
                 "All runs are listed in round order.")
        L.append("")
        L.append("| method | arguments | wall s | all runs (s) | CPU s | setup s | count s | source | counted == analytic "
                 "| predicted prefill speed-up |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in fl["rows"]:
            t = r.get("timing", {})
            L.append(f"| {r['method']} | `{r['args']}` | {r['seconds']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r.get('seconds_all', [r['seconds']]))} | "
                     f"{r.get('cpu_seconds', 0):.1f} | {_f(t.get('setup'), 1)} | {_f(t.get('count'), 1)} | "
                     f"{r.get('source', r.get('error', '-'))} | {_f(r.get('match'))} | {_f(r.get('predicted_speedup'))} |")
        L.append("")
        L.append("wall = the whole command (interpreter start, imports, config, counting, exit); CPU = its user + "
                 "system CPU time; setup = the tool's own timer from parsing the overrides to the meta-device model "
                 "(Hydra, the transformers config and modeling imports, the model); count = the counted prefill "
                 "and decode forwards (0 where the method reads values and its analytic numbers are shown; on the "
                 "meta device an op costs Python time, not arithmetic, and the counter reuses the output shapes "
                 "of ops it has already seen on the same operand shapes, see harness/efficiency/flops.py).")
        if "import_floor_s" in fl:
            L.append(f"Import floor: `python -c \"{fl['import_floor_cmd']}\"` takes **{fl['import_floor_s']:.1f} s** "
                     f"(runs: {', '.join(f'{x:.1f}' for x in fl['import_floor_all'])}): the part of every count that "
                     "no code of vtbench runs in.")
        notes = sorted({n for r in fl["rows"] for n in r.get("notes", []) if "meta device" in n})
        for n in notes:
            L.append(f"- note from vtbench-flops: {n} ({', '.join(r['method'] for r in fl['rows'] if n in r.get('notes', []))})")
        L.append("")
        L.append(f"Target: every count under {fl['limit_s']:.0f} s — wall time: "
                 f"**{'met' if fl['all_under_limit'] else 'MISSED'}**; CPU time: "
                 f"**{'met' if all(r.get('cpu_seconds', 1e9) < fl['limit_s'] and r['rc'] == 0 for r in fl['rows']) else 'MISSED'}**.")
        L.append("")
    return "\n".join(L) + "\n"


def explain_misses(mm: dict) -> str:
    """Where the time of each method under target goes, relative to what its FLOPs predict."""
    rows = {r["method"]: r for r in mm["rows"]}
    pn = mm["profiles"]["none"]
    out = ["Time per component (one prefill, forward hooks; expected = `none`'s time for the component x the "
           "method's counted FLOPs of that component / `none`'s; GFLOP/s = counted FLOPs / time):", "",
           "| method | component | time (s) | expected (s) | excess (s) | GFLOP/s |", "|---|---|---|---|---|---|"]
    fn_ = rows["none"]["prefill_flops_by_component"]
    for name, p in mm["profiles"].items():
        ct, tn = p.get("components_s"), pn.get("components_s")
        if not ct or not tn:
            continue
        fm = rows[name]["prefill_flops_by_component"]
        for c in ("vision", "projector", "llm", "lm_head", "outside"):
            t = ct.get(c, 0.0)
            if c == "outside":
                exp, gfs = tn["outside"], None
            else:
                exp = tn[c] * (fm.get(c, 0) / fn_[c]) if fn_.get(c) else 0.0
                gfs = fm.get(c, 0) / t / 1e9 if t > 0 else None
            out.append(f"| {name} | {c} | {t:.3f} | {exp:.3f} | {t - exp:+.3f} | {_f(gfs, 1)} |")
    out += ["", "Gap analysis by operator class (from the profile: the time each class would take if it scaled "
            "with the predicted speed-up, vs what it took):", ""]
    for name, p in mm["profiles"].items():
        if name == "none":
            continue
        pred = rows[name]["prefill_predicted"]
        expected = {g: v / pred for g, v in pn["groups_ms"].items()}
        excess = {g: p["groups_ms"][g] - expected[g] for g in expected}
        worst = sorted(excess.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{g} {v:+.0f} ms" for g, v in worst)
        mat_eff = (pn["groups_ms"]["matmul"] / pred) / p["groups_ms"]["matmul"] if p["groups_ms"]["matmul"] else 0
        out.append(f"- **{name}**: profiled {p['total_ms']:.0f} ms vs {pn['total_ms'] / pred:.0f} ms expected from "
                   f"`none`'s profile / {pred:.2f}; excess by class: {parts}. Matmul time scales at "
                   f"{mat_eff:.2f} of the FLOPs prediction (below 1: smaller matrices run at a lower GFLOP/s).")
        ow = p.get("own_work")
        rnd = rows.get("random")
        if ow and ow["total_s"] > 0:
            share = ow["own_s"] / ow["total_s"]  # applied to the interleaved medians of the table above
            rest = rows["none"]["prefill_s"] / max(rows[name]["prefill_s"] * (1 - share), 1e-9) / pred
            out.append(f"  The method's own per-layer work (its reduction plan's scoring and merging calls: "
                       f"attention rows and their softmax, top-k, quantiles, weighted merges, index bookkeeping) "
                       f"takes {ow['own_s']:.3f} s of a {ow['total_s']:.3f} s prefill "
                       f"({100 * ow['own_s'] / ow['total_s']:.1f} %); the rest of the prefill alone would reach a "
                       f"ratio of {rest:.2f}"
                       + (f" (random, which has no such work: {rnd['prefill_ratio']:.2f})" if rnd else "")
                       + ". The work is part of the method's definition (scores from every merge layer's own "
                       "attention), element-wise and memory-bound, so FLOPs, which count matrix products only, "
                       "cannot predict it: that share of the gap is structural.")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = ["method", "description", "prefill_flops", "prefill_s", "prefill_spread", "prefill_measured",
            "prefill_predicted", "prefill_ratio", "prefill_ratio_rom", "target", "target_met", "generate_flops", "generate_s",
            "generate_spread", "generate_measured", "generate_predicted", "generate_ratio",
            "counted_equals_analytic", "kv_cache_bytes", "prefill_peak_mem_bytes", "generate_peak_mem_bytes"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    path.write_text(buf.getvalue())


def _parser():
    from harness.console import ArgumentParser, positive_int

    ap = ArgumentParser(prog="vtbench-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repetition (smoke test)")
    ap.add_argument("--repeats", type=positive_int, default=None, help="prefill repetitions (default 5; generate: 3/5 of it)")
    ap.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all; "
                    f"with --gpu-full: {','.join(GPU_PARTS)})")
    ap.add_argument("--methods", default=None, help=f"methods of the methods part (default: {','.join(METHODS)}; "
                    f"with --gpu-full also {','.join(COMPOSITIONS)})")
    ap.add_argument("--batch-methods", default=None, help="methods of the batch part (default: none; with "
                    f"--gpu-full: {','.join(GPU_BATCH_METHODS)})")
    ap.add_argument("--flops-methods", default=None, help="methods of the flops part (default: --methods)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default 2 on CPU)")
    ap.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--arch", default=None, help="full architecture from conf/model (llava15_7b, llava_next_7b, ...; "
                    "GPU); with --gpu-full a comma-separated list (default: " + ",".join(GPU_ARCHS) + ")")
    ap.add_argument("--machine", default=None, help="report name (default: the CPU/GPU model)")
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=INT",
                    help="override a size of the random model (build_tiny argument), e.g. num_layers=8")
    ap.add_argument("--gpu-full", action="store_true",
                    help="the GPU benchmark (`make bench-gpu`): full-size random LLaVA-1.5-7B and LLaVA-NeXT-7B in "
                         "fp16, every method, methods/scores/batch parts, under a wall-clock budget; one line and "
                         "exit 0 on a machine without a CUDA GPU")
    ap.add_argument("--budget-s", type=positive_int, default=None,
                    help=f"--gpu-full: wall-clock budget of the measurements in seconds (default {GPU_BUDGET_S})")
    return ap


def _names(text: str | None, default, ap, what: str) -> list[str]:
    """A comma-separated method list with `none` first (the reference); unknown names are bad input."""
    names = [m.strip() for m in (text or ",".join(default)).split(",") if m.strip()]
    bad = [n for n in names if n not in ALL_METHODS]
    if bad:
        ap.error(f"{what} {','.join(bad)}: unknown method(s); choose from {', '.join(ALL_METHODS)}")
    return ["none"] + [n for n in dict.fromkeys(names) if n != "none"]


def _parts(text: str | None, allowed, ap) -> list[str]:
    parts = [p.strip() for p in (text or ",".join(allowed)).split(",") if p.strip()]
    bad = [p for p in parts if p not in allowed]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {', '.join(allowed)}")
    return parts


def bench_meta(spec: Spec, machine: str, command: str, clock: str, model: str) -> dict:
    """The report's header: machine, software, settings."""
    import transformers

    from harness.environment import git_state

    git = git_state()
    return {
        "machine": machine, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "device": spec.device if not spec.device.startswith("cuda") else torch.cuda.get_device_name(),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "dtype": spec.dtype,
        "clock": "process CPU time (time.process_time)" if clock == "cpu" else "wall time (time.perf_counter)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "git": f"{(git.get('sha') or '?')[:10]}{' (dirty)' if git.get('dirty') else ''}",
        "loadavg_start": loadavg(), "quick": spec.quick, "model": model, "counter": spec.counter,
        "repeats": f"prefill {spec.repeats}, generate / scores {spec.gen_repeats}, batch {max(1, spec.gen_repeats // 2)}",
        "note": "QUICK MODE (tiny model, smoke test): these numbers mean nothing." if spec.quick else "",
    }


def write_report(res: dict, stem: Path) -> dict:
    """`<stem>.md` (the report), `.json` (everything) and `.csv` (the methods table, when run); the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(render(res))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    if "methods" in res:
        write_csv(stem.with_suffix(".csv"), res["methods"]["rows"])
    return {"md": str(stem.with_suffix(".md")), "json": str(stem.with_suffix(".json")),
            "csv": str(stem.with_suffix(".csv")) if "methods" in res else None}


def run(argv: list[str] | None = None) -> dict:
    from harness.console import positive_int

    ap = _parser()
    a = ap.parse_args(argv)
    command = "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.gpu_full:
        return gpu_full_cli(ap, a, command)
    from harness.config import DEVICE_RE, device_error, group_options

    device = a.device or "cpu"
    if a.budget_s is not None:
        ap.error("--budget-s applies to --gpu-full only")
    if not DEVICE_RE.match(device) or device_error(device):
        ap.error(f"--device {device}: {device_error(device) if DEVICE_RE.match(device) else 'not a device (cpu, cuda, cuda:N, mps)'}")
    if a.arch is not None and a.arch not in group_options("model"):
        ap.error(f"--arch {a.arch}: choose from {', '.join(group_options('model'))}")
    if a.arch is not None:
        try:
            full_config(a.arch)
        except ValueError as e:
            ap.error(f"--arch {e}")
    parts = _parts(a.parts, PARTS, ap)
    names = _names(a.methods, METHODS, ap, "--methods")
    spec = Spec.make(a.quick, a.repeats, a.threads, device)
    for kv in a.model_arg:
        k, _, v = kv.partition("=")
        if k not in spec.model:
            ap.error(f"--model-arg {k!r}: choose from {', '.join(spec.model)}")
        try:
            spec.model[k] = positive_int(v)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--model-arg {kv}: {e}")
    torch.set_num_threads(spec.threads)
    CLOCK[0] = time.process_time if a.clock == "cpu" else time.perf_counter
    bench = Bench(spec, arch=a.arch)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"meta": bench_meta(
        spec, a.machine or machine_name(spec.device), command, a.clock,
        a.arch or "random LLaVA-1.5-shaped " + ", ".join(f"{k}={v}" for k, v in spec.model.items()))}
    if "flops" in parts:  # first: a command-line tool's speed on the machine before the timing parts load it
        fm = [m.strip() for m in (a.flops_methods or ",".join(n for n in names if n in METHODS)).split(",") if m.strip()]
        if any(m not in METHODS for m in fm):  # the compositions have no `vtbench-flops` overrides here
            ap.error(f"--flops-methods {','.join(m for m in fm if m not in METHODS)}: choose from {', '.join(METHODS)}")
        res["flops"] = bench.flops(fm, repeats=1 if spec.quick else 3)
    if "overhead" in parts:
        res["overhead"] = bench.overhead()
    if "methods" in parts:
        res["methods"] = bench.methods(names)
    if "scores" in parts:
        res["scores"] = bench.scores()
    if "batch" in parts:
        res["batch"] = bench.batch(_names(a.batch_methods, ("none",), ap, "--batch-methods"))
    CLOCK[0] = time.perf_counter
    res["meta"]["loadavg_end"] = loadavg()
    res["meta"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["paths"] = write_report(res, Path(a.out) / res["meta"]["machine"])
    bench.log(f"wrote {res['paths']['md']} ({res['meta']['wall_seconds']}s)")
    return res


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


def gpu_full_cli(ap, a, command: str) -> dict:
    """`--gpu-full` from the command line: checks, then `run_gpu_full`. Without a CUDA GPU: one line, exit 0,
    nothing written."""
    from harness.config import device_error

    for flag, bad in (("--quick", a.quick), ("--clock cpu", a.clock == "cpu"), ("--model-arg", a.model_arg),
                      ("--threads", a.threads), ("--flops-methods", a.flops_methods)):
        if bad:
            ap.error(f"{flag} does not apply to --gpu-full")
    device = a.device or "cuda"
    if not re.match(r"^cuda(:\d+)?$", device):
        ap.error(f"--device {device}: --gpu-full runs on a CUDA device (cuda, cuda:N)")
    archs = [x.strip() for x in (a.arch or ",".join(GPU_ARCHS)).split(",") if x.strip()]
    for arch in archs:
        try:
            full_config(arch)
        except ValueError as e:
            ap.error(f"--arch {e}")
        except Exception as e:  # noqa: BLE001 - an unknown config group option: one line
            ap.error(f"--arch {arch}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    parts = _parts(a.parts, GPU_PARTS, ap)
    names = _names(a.methods, ALL_METHODS, ap, "--methods")
    batch_names = _names(a.batch_methods, GPU_BATCH_METHODS, ap, "--batch-methods")
    if not torch.cuda.is_available():
        print(NO_GPU_LINE, flush=True)
        return {"skipped": NO_GPU_LINE}
    if device_error(device):
        ap.error(f"--device {device}: {device_error(device)}")
    if ":" in device:
        torch.cuda.set_device(device)
    return run_gpu_full(out=Path(a.out), device=device, archs=archs, names=names, parts=parts,
                        batch_names=batch_names, repeats=a.repeats, budget_s=a.budget_s or GPU_BUDGET_S,
                        machine=a.machine, command=command)


def run_gpu_full(*, out: Path, device: str = "cuda", dtype: str = "float16", archs=GPU_ARCHS, names=None,
                 parts=GPU_PARTS, batch_names=GPU_BATCH_METHODS, repeats: int | None = None,
                 budget_s: float = GPU_BUDGET_S, machine: str | None = None,
                 command: str = "python -m harness.bench --gpu-full",
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from harness.console import run_script

    def _run(argv):
        res = run(argv)
        if res.get("failed"):  # --gpu-full: an architecture failed (its report says why)
            print(f"vtbench-bench: failed: {'; '.join(res['failed'])}", file=sys.stderr, flush=True)
            return 1
        return 0

    return run_script("vtbench-bench", _run, argv, interrupt_note="reports are written only at the end; rerun")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
