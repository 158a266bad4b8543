"""`random` — drop a seeded random subset of visual tokens at the LLM input, or at any decoder layer.

A control baseline (FastV paper §4.1 / Table 7 "random drop"; FiCoCo v1 Table 3 "Random Sampling"): the
kept visual tokens are a uniformly random subset of size `keep` (or `round(N_img * keep_ratio)`).

Which subset (`per_sample`, default true): a fresh subset per sample, drawn from a generator seeded by
the method's `seed` and the sample's document, i.e. a digest of the sample's own prompt ids and image
pixels (`methods._shared.document`) -- like the random baselines of the literature, which draw per
image. A sample gets the same subset at batch 1 and inside a padded batch, and every forward of one
generation uses it (it is chosen at the prefill; an uncached forward over prompt + generated tokens hashes
the prompt only). `per_sample=false` keeps the earlier behaviour: one subset, drawn from `seed` alone,
the same relative positions for every sample. The seed rule: the subset depends on `method.params.seed`
only, never on `run.seed` (which seeds lmms-eval and torch), so a seed sweep is `method.params.seed=0,1,2`
and the report aggregates the cells that differ only in it.

Tokens are removed before decoder layer `layer` (0: the LLM input, the default and the earlier behaviour)
through the shared LLM-reduction machinery (`methods._shared.llm_reduce`): layers before it run on all
tokens, it and every later layer run on, and cache, the kept tokens only (UniPruneBench's in-LLM random
control; "All You Need Are Random Visual Tokens?" drops at deeper layers); kept tokens keep their
positions (`positions="keep"`) or are renumbered. A method that cannot beat it at equal budget is not selecting
anything useful; a benchmark on which it scores like the full model does not need the image much.
"""
from __future__ import annotations

import dataclasses
import random as _random

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods._shared.document import document_seeds
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


def kept_visual(n_visual: int, keep_ratio: float, keep: int | None) -> int:
    if keep is not None:
        return min(int(keep), n_visual)
    return int(round(n_visual * keep_ratio))


def random_subset(n_visual: int, n_keep: int, seed: int) -> torch.Tensor:
    """Sorted ordinals (0..n_visual-1) of the kept visual tokens (Python's seeded `random.Random`, so
    the choice is independent of torch's global RNG and device)."""
    chosen = _random.Random(int(seed)).sample(range(n_visual), n_keep)
    return torch.tensor(sorted(chosen), dtype=torch.long)


class _RandomPlan(LR.ReductionPlan):
    def __init__(self, keep_ratio, keep, seed, positions, layer=0, per_sample=True):
        self.first_layer = layer
        self.keep_ratio, self.keep, self.seed, self.positions = keep_ratio, keep, seed, positions
        self.per_sample = per_sample

    def before_layer(self, view):
        if view.layer != self.first_layer:
            return None
        visual = view.visual
        nv = LR.equal_visual_count(visual, "random")
        n_keep = kept_visual(nv, self.keep_ratio, self.keep)
        if n_keep >= nv:
            return None
        B = visual.shape[0]
        seeds = document_seeds(view, self.seed) if self.per_sample else [self.seed] * B
        chosen = torch.zeros(B, nv, dtype=torch.bool)
        for b, s in enumerate(seeds):
            chosen[b, random_subset(nv, n_keep, s)] = True
        scores = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        # each sample's visual tokens, in order, get 1 if chosen, 0 otherwise
        scores[visual] = chosen.to(visual.device).float().flatten()
        return LR.keep_top_visual(scores, visual, n_keep)


@register
@dataclasses.dataclass
class RandomDrop(Method):
    name = "random"
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "keep"
    budget_param = "keep"
    noop = {"keep_ratio": 1.0}
    #: dropped at layer 1 (layer 0 is the same machinery one layer earlier); a share, so the Qwen test
    #: prompts' few visual tokens are reduced too
    example = {"keep_ratio": 0.4, "layer": 1}
    #: `layer` came later; at 0 (the LLM input) it is the earlier method, and cells keep their keys
    key_defaults = {"layer": 0}
    #: a fresh subset per sample is the behaviour since `per_sample` exists: a config that does not spell it
    #: out (a composition member) must not share a key with the earlier one-subset records
    key_explicit = {"per_sample": True}

    #: fraction of visual tokens kept, in (0, 1]; 1.0 is the no-op
    keep_ratio: float = 0.1
    #: number of visual tokens kept (overrides keep_ratio when set)
    keep: int | None = None
    #: seed of the generator choosing the subset (the only seed it depends on; run.seed does not enter)
    seed: int = 0
    #: true: a fresh subset per sample, seeded by `seed` and the sample's document; false: one subset
    #: (from `seed` alone) at the same relative positions for every sample (the earlier behaviour)
    per_sample: bool = True
    #: "keep" original RoPE positions or "renumber" them contiguously
    positions: str = "keep"
    #: decoder layer at whose input the tokens are dropped (0 = the LLM input)
    layer: int = 0

    def check_params(self) -> None:
        if not (0.0 < float(self.keep_ratio) <= 1.0):
            raise MethodError(f"random: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise MethodError(f"random: keep must be an integer >= 1 (visual tokens kept), got {self.keep!r}")
        from methods import check_seed

        check_seed("random", "seed", self.seed)
        if self.positions not in ("keep", "renumber"):
            raise MethodError(f"random: positions must be 'keep' or 'renumber', got {self.positions!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise MethodError(f"random: layer must be an integer >= 0 (the decoder layer the drop happens at), got {self.layer!r}")
        if not isinstance(self.per_sample, bool):
            raise MethodError(f"random: per_sample must be true or false, got {self.per_sample!r}")

    def validate(self, adapter) -> None:
        super().validate(adapter)
        if self.keep is not None or float(self.keep_ratio) < 1.0:
            self.require_full_attention(adapter)
            if self.layer >= adapter.num_llm_layers:
                raise MethodError(
                    f"random: layer={self.layer} must be < the number of LLM layers ({adapter.num_llm_layers})"
                )
            LR.check_positions(self.positions, adapter, "random")
        if self.keep is not None and adapter.family == "llava" and self.keep > adapter.visual_tokens_per_image:
            raise MethodError(
                f"random: keep={self.keep} exceeds the {adapter.visual_tokens_per_image} visual tokens per image"
            )

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"keep": int(value)}
        return {"keep": None, "keep_ratio": float(value)}

    def visual_tokens_kept(self, layout) -> int:
        return min(layout.visual, kept_visual(layout.visual, float(self.keep_ratio), self.keep))

    def apply(self, model, adapter):
        self.validate(adapter)
        if self.keep is None and float(self.keep_ratio) == 1.0:
            return model
        LR.install(model, adapter, _RandomPlan(float(self.keep_ratio), self.keep, self.seed, self.positions,
                                               self.layer, per_sample=self.per_sample))
        return model

    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """All visual tokens at the input of layers < `layer`, the kept ones from `layer` on; no
        selection cost."""
        kept = kept_visual(layout.visual, float(self.keep_ratio), self.keep)
        if kept >= layout.visual:
            return None
        return [layout.visual] * self.layer + [kept] * (shapes.llm.layers - self.layer), 0

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
