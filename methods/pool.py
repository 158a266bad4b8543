"""`pool` — 2-D average pooling of each crop's visual grid to the budget (a control baseline, no signal).

The baseline UniPruneBench ("Can Visual Input Be Compressed?", Peng et al., arXiv 2511.02650) runs as
"Pool" beside random pruning, and the pooling LLaVA-OneVision / LLaVA-Video apply to video frames: the
visual tokens of one image (LLaVA-1.5) or one anyres crop (LLaVA-NeXT) form an H x W grid
(24 x 24 for CLIP-L/336); k tokens are kept as the means of k rectangular cells of that grid,

    t'_c = (1 / |c|) * sum_{(i, j) in c} t_{i, j}        for each cell c of the pooled grid,

with PyTorch's adaptive-pooling cells (k = g^2: `adaptive_avg_pool2d(grid, (g, g))`; 576 -> 64 is 3 x 3
averaging). A count that is not a rectangle is met exactly by bands of rows with w or w + 1 cells
(`methods/_shared/grid.py`: k = 190 of 24 x 24 -> 14 bands, 8 of 14 cells and 6 of 13).

Placement: at the projector's output, before the LLM (UniPruneBench pools the projected `vit_embeds`;
LLaVA-OneVision pools video frames after its projector too): the CLIP tower and the projector run on
every patch, the LLM gets k tokens per crop in raster order. The projector is a per-token MLP, so pooling
before it would be another method (and save its small cost); here it is not saved.

Budgets: `tokens` (k per crop) or `prompt_tokens` (a count > 1 or a share <= 1 of the prompt's visual
tokens, what `budget.kind=tokens` sets): every crop of a prompt gets the same k, the nearest to the target
(`VisionReductionMethod.crop_tokens`), so one-image LLaVA-1.5 prompts meet it exactly and prompts of several
images or crops land within crops/2 of it (the rule of every vision-side method). LLaVA-NeXT images are packed as [crop 1 k tokens, ..., crop c k tokens, image_newline]
(the 2-D unpadding needs full grids; as ToMe / FiCoCo-V do). The image placeholder run is shrunk to
match (`methods/_shared/vision_reduce.install_placeholder_shrink`), so prefill and decode see one
consistent, shorter sequence with contiguous positions.

FLOPs (MACs): vision and projector dense over every crop; LLM over text + crops * k (+ NeXT newlines); the
averaging is element-wise (not counted).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from methods import register
from methods._shared.grid import GridReductionMethod, content_holder, pool_grid, pool_share, record_content


@register
@dataclasses.dataclass
class Pool(GridReductionMethod):
    name = "pool"
    budget_tokens_param = "prompt_tokens"
    budget_param = "tokens"
    #: no pooling at all (the model is left untouched)
    noop: ClassVar[dict | None] = {"tokens": None, "prompt_tokens": None}
    #: 64 -> 16 tokens per crop on the tiny models (8 x 8 -> 4 x 4, 2 x 2 averaging)
    example: ClassVar[dict | None] = {"tokens": 16}

    #: visual tokens per image / crop after pooling (null with prompt_tokens null: no pooling)
    tokens: int | None = None
    #: visual tokens for the whole prompt: a count (> 1) or a share (<= 1) of its visual tokens (overrides
    #: tokens; what budget.kind=tokens sets)
    prompt_tokens: float | None = None

    def install(self, model, adapter, geom, state) -> None:
        side = self.side(geom)
        holder = content_holder(model)

        def pool(module, args, out):
            k = state["k"]
            if k is None or out.dim() != 3 or out.shape[1] != side * side or k >= side * side:
                return out
            record_content(holder, pool_share(k, side, side), out.shape[0])
            return pool_grid(out, side, side, k)

        adapter.projector.register_forward_hook(pool)

    def grid_prefill_macs(self, shapes, geom, passes, k):
        from harness.efficiency.analytic import projector_macs, vit_macs

        vision = passes * vit_macs(shapes.vit, shapes.vit_layers_run)
        return vision, projector_macs(shapes.vit.hidden, shapes.llm.hidden, passes * geom.visual_per_crop)
