"""`stride` — keep every k-th visual token at the LLM input (a baseline, and the README's worked example
of "Add a method": the smallest method that passes the conformance suite, `tests/methods/test_conformance.py`).

The visual tokens of a prompt, in order (all images, all crops), are thinned before decoder layer 0:

    kept = {0, k, 2k, ...}                      (stride = k; ceil(N / k) tokens kept)
    kept = {floor(i * N / n) : i = 0 .. n - 1}  (keep = n, or keep = s <= 1: n = round(s * N); evenly spaced)

through the shared LLM-side machinery (`methods._shared.llm_reduce`): every layer runs on, and caches,
the kept tokens only (their original positions kept, M-RoPE's three streams included), so the saving is
real and fvcore's count equals `analytic_prefill_macs` below. `stride=1` is the documented no-op.
"""
from __future__ import annotations

import dataclasses

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


def kept_ordinals(n_visual: int, stride: int, keep: float | None) -> list[int]:
    """Ordinals (0..N-1) of the kept visual tokens of a prompt with N = `n_visual` of them."""
    if keep is None:
        return list(range(0, n_visual, stride))
    n = int(keep) if float(keep) > 1 else int(round(float(keep) * n_visual))
    n = max(1, min(n, n_visual)) if n_visual else 0
    return [i * n_visual // n for i in range(n)]


class _StridePlan(LR.ReductionPlan):
    def __init__(self, stride: int, keep: float | None):
        self.stride, self.keep = stride, keep

    def before_layer(self, view):
        if view.layer != 0:
            return None
        visual = view.visual  # [B, n] bool: the visual tokens of every sample
        nv = LR.equal_visual_count(visual, "stride")
        chosen = kept_ordinals(nv, self.stride, self.keep)
        if len(chosen) >= nv:
            return None
        scores = torch.zeros(nv)
        scores[chosen] = 1.0  # the chosen ordinals score 1, the others 0
        per_token = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        per_token[visual] = scores.to(visual.device).repeat(visual.shape[0])
        return LR.keep_top_visual(per_token, visual, len(chosen))


@register
@dataclasses.dataclass
class Stride(Method):
    name = "stride"
    families = LLM_SIDE_FAMILIES          # the LLM-side machinery acts on every family's decoder
    noop = {"stride": 1}                  # keeps every token: logits identical to the unpatched model
    example = {"stride": 3}               # keeps 22 of 64 visual tokens per image on the tiny models
    meta_countable = False                # the visual tokens are found from `input_ids` values
    budget_tokens_param = "keep"          # budget.kind=tokens sets keep (a count > 1 or a share <= 1)
    budget_param = "keep"                 # budget.kind=flops is solved over keep
    budget_ignores = ("stride",)          # any budget overrides stride

    #: keep every `stride`-th visual token (1 = all of them: the no-op)
    stride: int = 2
    #: visual tokens kept per prompt, evenly spaced: a count (> 1) or a share (<= 1); overrides stride
    keep: float | None = None

    def check_params(self) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise MethodError(f"stride: stride must be an integer >= 1, got {self.stride!r}")
        if self.keep is not None and not (float(self.keep) > 0 and (float(self.keep) <= 1 or float(self.keep) == int(self.keep))):
            raise MethodError(f"stride: keep must be a share in (0, 1] or a whole count > 1, got {self.keep!r}")

    def validate(self, adapter) -> None:
        super().validate(adapter)  # the family check (one line)
        if self.keep is not None or self.stride > 1:
            self.require_full_attention(adapter)

    def apply(self, model, adapter):
        self.validate(adapter)
        if self.keep is None and self.stride == 1:
            return model  # the no-op leaves the model untouched
        LR.install(model, adapter, _StridePlan(self.stride, self.keep))
        return model

    # ---- what the suite checks against the model's own count --------------------------------------------
    def visual_tokens_kept(self, layout) -> int:
        return len(kept_ordinals(layout.visual, self.stride, self.keep))

    def llm_visual_schedule(self, shapes, layout):
        kept = self.visual_tokens_kept(layout)
        return None if kept >= layout.visual else ([kept] * shapes.llm.layers, 0)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        macs = A.dense_prefill_macs(shapes, layout)  # vision tower, projector and LM head unchanged
        kept = self.visual_tokens_kept(layout)
        macs["llm"] = A.llm_prefill_macs(shapes.llm, layout.with_visual(kept).total)  # every layer on the kept tokens
        return macs

