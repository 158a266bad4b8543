"""`downsample` — the image itself at a lower resolution (a control baseline, no signal).

VTC-Bench (Liao et al., arXiv 2510.07143) finds that plain image downsampling beats many token-reduction
methods and uses it to split benchmarks into "easy" and "hard" samples. Here each image (LLaVA-1.5) or
anyres crop (LLaVA-NeXT), as the processor prepared it (S x S pixels, S = 336 for CLIP-L/336), is resized
to rows x cols patches,

    x' = resize_bicubic_antialiased(x, (rows * p, cols * p)),     p = the tower's patch size,

and the CLIP tower runs on that smaller image with its position embeddings bicubically interpolated to the
rows x cols grid (transformers' `interpolate_pos_encoding`; at the full size it returns the trained
embeddings unchanged). Every CLIP layer, the projector and the LLM then work on rows * cols tokens per
crop: FLOPs fall in the vision tower too.

The resize acts on the processor's pixel tensor (normalised per channel; bicubic resampling with weights
summing to 1 commutes with that affine normalisation), with PyTorch's antialiased bicubic kernel (a = -0.5,
PIL's). It is the S x S image the tower would see that is resized, not the original file: the original is
not available to a method (it acts on the model), so the image is resampled twice (processor, then here).

The grid: rows x cols is the largest near-square grid (g x g, g x (g + 1) or (g + 1) x (g + 1), g =
floor(sqrt(k))) with at most k patches, for the per-crop target k of the budget rule
(`VisionReductionMethod.crop_tokens`); a rectangle of exactly k patches would distort the image (or not
exist for a prime k), so the count may sit below the target by up to 2 g (576 -> 64: 8 x 8 from 336 to
112 pixels; 190 -> 13 x 14 = 182), and every record carries the count delivered (`visual_tokens_kept`).

LLaVA-NeXT: every crop (base and high-res) is resized to the same grid and the image packed as
[crop tokens..., image_newline] (as the other vision-side methods); the placeholder runs shrink to match
(`methods/_shared/vision_reduce.install_placeholder_shrink`).

FLOPs (MACs): per crop, the patch embedding of rows * cols patches and every CLIP layer over rows * cols
+ 1 tokens (`analytic.vit_resized_macs`); projector and LLM over the delivered count. The resizing and the
position-embedding interpolation are element-wise (not counted).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods import register
from methods._shared.grid import GridReductionMethod, content_holder, downsample_grid, record_content, resize_share


def resize_pixels(pixel_values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, height, width], antialiased bicubic, computed in float32."""
    if tuple(pixel_values.shape[-2:]) == (height, width):
        return pixel_values
    out = F.interpolate(pixel_values.float(), size=(height, width), mode="bicubic", antialias=True,
                        align_corners=False)
    return out.to(pixel_values.dtype)


@register
@dataclasses.dataclass
class Downsample(GridReductionMethod):
    name = "downsample"
    budget_tokens_param = "prompt_tokens"
    budget_param = "tokens"
    #: the image at its full size (the model is left untouched)
    noop: ClassVar[dict | None] = {"tokens": None, "prompt_tokens": None}
    #: 64 -> 16 tokens per crop on the tiny models (64 x 64 pixels -> 32 x 32, a 4 x 4 patch grid)
    example: ClassVar[dict | None] = {"tokens": 16}

    #: target visual tokens per image / crop: the image is resized to the largest near-square patch grid with
    #: at most this many patches (null with prompt_tokens null: full size)
    tokens: int | None = None
    #: visual tokens for the whole prompt: a count (> 1) or a share (<= 1) of its visual tokens (overrides
    #: tokens; what budget.kind=tokens sets); each crop's target is then met as `tokens` is
    prompt_tokens: float | None = None

    def delivered(self, k, geom) -> int:
        side = self.side(geom)
        rows, cols = downsample_grid(int(k), side, side)
        return rows * cols

    def install(self, model, adapter, geom, state) -> None:
        side = self.side(geom)
        patch = int(adapter.vision_config.patch_size)
        holder = content_holder(model)

        def resize(module, args, kwargs):
            k = state["k"]
            if k is None or k >= side * side:
                return None
            rows, cols = downsample_grid(k, side, side)
            pv = args[0] if args else kwargs["pixel_values"]
            if holder.track:
                record_content(holder, resize_share(rows, cols, side, side), pv.shape[0])
            pv = resize_pixels(pv, rows * patch, cols * patch)
            kwargs = dict(kwargs, interpolate_pos_encoding=True)
            if args:
                return (pv, *args[1:]), kwargs
            return args, dict(kwargs, pixel_values=pv)

        adapter.vision_tower.register_forward_pre_hook(resize, with_kwargs=True)

    def grid_prefill_macs(self, shapes, geom, passes, k):
        from harness.efficiency.analytic import projector_macs, vit_resized_macs

        vision = passes * vit_resized_macs(shapes.vit, k, shapes.vit_layers_run)
        return vision, projector_macs(shapes.vit.hidden, shapes.llm.hidden, passes * k)
