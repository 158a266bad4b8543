"""`Bench`: the shared inputs (model, processor, prompts) composed with one mixin per part."""
from __future__ import annotations

import sys
import time

import torch

from harness.bench.batch import BatchPart
from harness.bench.counting import CountingPart
from harness.bench.measure import TimeGuard
from harness.bench.methods import MethodsPart
from harness.bench.overhead import OverheadPart
from harness.bench.scores import ScoresPart
from harness.bench.setup import Spec, bench_image_size, build_full, build_model
from harness.bench.sweep import SweepPart


class Bench(OverheadPart, MethodsPart, ScoresPart, BatchPart, CountingPart, SweepPart):
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
