"""FiCoCo-VL (Han et al., arXiv 2411.17686 **v1** "Rethinking Token Reduction in MLLMs: Towards a Unified
Paradigm for Training-Free Acceleration", Tables 3/5/8; dropped from v4): FiCoCo-V in the CLIP vision
encoder followed by FiCoCo-L in the LLM decoder, composed from `methods/ficoco_v.py` and
`methods/ficoco_l.py` (each keeps its own equations, options and defaults).

Budget split (undocumented by the authors, spec §3.6 / Part 6 item 4, so it is a parameter here): the LLM
ends with `tokens` visual tokens per image; the vision stage removes the share `vision_share` of the
576 − tokens removals (rounded), i.e. FiCoCo-V leaves `vision_tokens = 576 − round(vision_share·(576 −
tokens))` tokens for the LLM's input, and FiCoCo-L spreads the rest over its merge layers (its
`final_tokens = tokens`). `vision_tokens` can also be given directly. Other parameters of the two stages
pass through `vision_params` and `llm_params` (e.g. `vision_params: {start_layer: 12}`,
`llm_params: {start_layer: 4, variant: code}`).

LLaVA-NeXT (anyres): `tokens` and `vision_tokens` are read per 576-token crop and the budget is a
*fraction* of the visual tokens, the same at both stages:
* vision encoder: FiCoCo-V reduces every crop (base + high-res crops) of an image independently to
  `vision_tokens` (`split(576)`, as on LLaVA-1.5); the image is packed as
  `[crop tokens..., image_newline]` (crops · vision_tokens + 1 visual tokens; see
  methods/_shared/vision_reduce.py). With no vision-side reduction (`vision_share: 0`) the LLM gets the
  model's own packing (unpadded crops with one `image_newline` per row);
* LLM: FiCoCo-L merges the packed crop *and* `image_newline` tokens that enter it down to the fraction
  `tokens / vision_tokens` of them (its `final_ratio`: max(1, round(tokens / vision_tokens · n_visual))).
On LLaVA-1.5 (one crop, no newline) that fraction is exactly `tokens` of `vision_tokens`, so there the
stage keeps `final_tokens = tokens` (unchanged behaviour and FLOPs). Batches on NeXT need images with the
same packed visual-token count (FiCoCo-L's equal per-sample budgets), e.g. the same crop count when
FiCoCo-V reduces.

Per-prompt budget (`prompt_tokens`, what `budget.kind=tokens` sets): a count or share of the prompt's N
visual tokens (all images, crops, NeXT newlines) left after the LLM stage; FiCoCo-V leaves
N - round(vision_share · (N - target)) (one equal count per crop, the nearest), FiCoCo-L merges down to
the target (a share is of N, the prompt's count before the vision stage).

FLOPs (analytic): FiCoCo-V's vision encoder and projector terms, FiCoCo-L's LLM term for an input with
FiCoCo-V's reduced visual count (NeXT: crops · vision_tokens + 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from methods import register
from methods._shared.vision_reduce import VisionGeometry
from methods.base import Method, MethodError
from methods.ficoco_l import FiCoCoL
from methods.ficoco_v import FiCoCoV


@dataclasses.dataclass(frozen=True)
class _VisionTarget:
    """Visual tokens the vision stage leaves for a prompt with n of them: n - round(share * (n - target))."""

    value: float
    share: float

    def __call__(self, n: int) -> int:
        from harness.budget import prompt_count

        return n - round(self.share * (n - prompt_count(self.value, n)))


@register
@dataclasses.dataclass
class FiCoCoVL(Method):
    name = "ficoco_vl"
    noop = {}
    example = {"tokens": 16, "vision_params": {"start_layer": 0}, "llm_params": {"start_layer": 1}}
    refusals = {
        "qwen2_vl": "its FiCoCo-V stage has no well-defined placement in Qwen2-VL's ViT (images packed at any size, "
        "a 2x2 patch merger at its end needs every patch); use ficoco_l",
        "qwen2_5_vl": "its FiCoCo-V stage has no well-defined placement in Qwen2.5-VL's windowed ViT (a 2x2 patch "
        "merger at its end needs every patch); use ficoco_l",
        "llava_onevision": "its FiCoCo-V stage cannot feed OneVision's anyres_max packing (it interpolates each image's "
        "unpadded feature grid, which merged tokens no longer form); use ficoco_l",
    }
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "prompt_tokens"
    budget_param = "tokens"
    #: visual tokens per image left after the LLM stage (e.g. 192 / 128 / 64 of 576); None = no reduction.
    #: LLaVA-NeXT: per crop, i.e. the LLM keeps the fraction tokens / vision_tokens of its visual tokens
    tokens: int | None = None
    #: visual tokens left after the LLM stage for the whole prompt (all images, crops and NeXT newlines):
    #: a count (> 1) or a share (<= 1) of the prompt's visual tokens (token budgets, harness/budget.py);
    #: the vision stage leaves N - round(vision_share * (N - target)) of the prompt's N (per crop: the
    #: nearest equal count), FiCoCo-L merges down to the target. Not with tokens / vision_tokens
    prompt_tokens: float | None = None
    #: share of the removals done in the vision encoder (0 = FiCoCo-L only, 1 = FiCoCo-V only)
    vision_share: float = 0.5
    #: visual tokens leaving the vision encoder (overrides vision_share); must be >= tokens
    vision_tokens: int | None = None
    #: extra FiCoCo-V parameters (not tokens / r)
    vision_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: extra FiCoCo-L parameters (not final_tokens / final_ratio / r / schedule)
    llm_params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check_params(self) -> None:
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise MethodError(f"ficoco_vl: tokens must be a positive integer, got {self.tokens!r}")
        pt = self.prompt_tokens
        if pt is not None:
            if isinstance(pt, bool) or not isinstance(pt, (int, float)) or pt <= 0 or (pt > 1 and int(pt) != pt):
                raise MethodError(f"ficoco_vl: prompt_tokens must be a share in (0, 1] or a whole count > 1, got {pt!r}")
            if self.tokens is not None or self.vision_tokens is not None:
                raise MethodError("ficoco_vl: give either prompt_tokens or tokens / vision_tokens, not both")
        if not 0.0 <= float(self.vision_share) <= 1.0:
            raise MethodError(f"ficoco_vl: vision_share must be in [0, 1], got {self.vision_share!r}")
        if self.vision_tokens is not None:
            if not isinstance(self.vision_tokens, int) or self.vision_tokens < 1:
                raise MethodError(f"ficoco_vl: vision_tokens must be a positive integer, got {self.vision_tokens!r}")
            if self.tokens is None or self.vision_tokens < self.tokens:
                raise MethodError(
                    f"ficoco_vl: vision_tokens={self.vision_tokens} needs tokens set and >= tokens ({self.tokens})"
                )
        stages = (
            ("vision_params", self.vision_params, ("tokens", "r")),
            ("llm_params", self.llm_params, ("final_tokens", "final_ratio", "r", "schedule")),
        )
        for stage, params, owned in stages:
            if not isinstance(params, dict):
                raise MethodError(f"ficoco_vl: {stage} must be a mapping of parameters, got {params!r}")
            clash = sorted(set(params) & set(owned))
            if clash:
                raise MethodError(f"ficoco_vl: set the budget with tokens / vision_tokens, not {stage}.{clash[0]}")
        for family in ("llava", "llava_next"):
            self._stages(576, family)  # parameter checks of both stages (budget-independent)

    # ---- the two stages ------------------------------------------------------------------------------
    def split(self, n_visual: int) -> int:
        """Visual tokens per image/crop leaving the vision encoder."""
        if self.tokens is None:
            return n_visual
        if self.vision_tokens is not None:
            return self.vision_tokens
        return n_visual - round(float(self.vision_share) * (n_visual - self.tokens))

    def _stages(self, n_visual: int, family: str = "llava") -> tuple[FiCoCoV, FiCoCoL]:
        """The two stages for `n_visual` visual tokens per image (LLaVA-1.5) / per crop (LLaVA-NeXT)."""
        import methods

        if self.prompt_tokens is not None:
            value, share = self.prompt_tokens, float(self.vision_share)
            v = methods.build("ficoco_v", dict(self.vision_params))
            if share > 0:
                v._target_fn = _VisionTarget(value, share)
            final = {"final_tokens": int(value)} if float(value) > 1 else {"final_ratio": float(value)}
            l_params = {**self.llm_params, **final} if share < 1 else {**self.llm_params, "r": 0}
            lm = methods.build("ficoco_l", l_params)
            lm._share_of_prompt = True
            return v, lm

        vt = self.split(n_visual)
        v = methods.build("ficoco_v", {**self.vision_params, "tokens": vt if vt < n_visual else None})
        final = self.tokens if self.tokens is not None and self.tokens < vt else None
        if final is None:
            l_params = {**self.llm_params, "r": 0}
        elif family == "llava_next":  # packed crops + newlines: keep the same fraction of them
            l_params = {**self.llm_params, "final_ratio": final / vt}
        else:
            l_params = {**self.llm_params, "final_tokens": final}
        return v, methods.build("ficoco_l", l_params)

    def validate(self, adapter) -> None:
        super().validate(adapter)
        n = adapter.visual_tokens_per_image
        per = "crop" if adapter.family == "llava_next" else "image"
        if self.tokens is not None and self.tokens > n:
            raise MethodError(f"ficoco_vl: tokens={self.tokens} exceeds the {n} visual tokens per {per}")
        if self.vision_tokens is not None and self.vision_tokens > n:
            raise MethodError(f"ficoco_vl: vision_tokens={self.vision_tokens} exceeds the {n} visual tokens per {per}")
        v, lm = self._stages(n, adapter.family)
        v.validate(adapter)
        if not lm._noop():  # a stage with nothing to do is not applied, so it needs no LLM depth
            lm.validate(adapter)
        self._v, self._l = v, lm

    def apply(self, model, adapter):
        self.validate(adapter)
        self._v.apply(model, adapter)
        if not self._l._noop():
            self._l.apply(model, adapter)
        return model

    def budget_token_params(self, value: float) -> dict:
        return {"prompt_tokens": int(value) if float(value) > 1 else float(value), "tokens": None,
                "vision_tokens": None}

    def _reduced(self, layout, shapes=None):
        """(stages, the layout entering the LLM) for a prompt `layout`."""
        v, lm = getattr(self, "_v", None), getattr(self, "_l", None)
        if v is None:
            v, lm = self._stages(shapes.vit.patches)
        geom = v._geom or VisionGeometry.from_shapes(shapes)
        visual = layout.visual
        if v.per_prompt or v.schedule(geom):
            visual = v.reduced_layout_counts(layout, geom)[2]
        return v, lm, dataclasses.replace(layout, visual=visual)

    def visual_tokens_kept(self, layout) -> int:
        v, lm, reduced = self._reduced(layout)
        if lm._noop():
            return reduced.visual
        return lm.visual_tokens_kept(reduced, prompt_visual=layout.visual)

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        """Visual tokens entering the LLM (its first layer) for LLaVA-1.5 images; FiCoCo-L then shrinks
        them to `tokens`. (LLaVA-NeXT: crops · vision_tokens + 1 per image, see the module docstring.)"""
        return self._v.visual_tokens_to_llm(n_visual)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        v, lm, reduced = self._reduced(layout, shapes)
        macs = dict(v.analytic_prefill_macs(shapes, layout))
        if lm._noop():
            return macs
        llm = lm.analytic_prefill_macs(shapes, reduced, prompt_visual=layout.visual)
        macs["llm"], macs["lm_head"] = llm["llm"], llm["lm_head"]
        return macs
