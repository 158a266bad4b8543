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

The grid: rows x cols = k exactly, for the per-crop target k of the budget rule
(`VisionReductionMethod.crop_tokens`), the most square rectangle with an aspect ratio of at most 2:1
(`grid.exact_grid`: 64 -> 8 x 8, from 336 to 112 pixels; 48 -> 6 x 8; 18 -> 3 x 6; 190 -> 10 x 19). A
rectangular grid distorts the image: the square crop is stretched to rows * p x cols * p pixels, its
width scaled cols / rows times more than its height (at most 2x); the layout of the content (what lies left
of, above what) is kept. A k with no such rectangle (a prime above 2, 10 = 2 x 5, 127) is refused, in one
line naming the nearest counts that work, at validation: `tokens` itself, and a per-prompt budget
(`prompt_tokens`, what budget.kind=tokens sets) on every prompt of one or two images of any size (the
per-crop targets of the model's one-image layouts and of every pair of them). A prompt of more images whose
per-crop target has no rectangle (a count of 64 over three images: 21 each) is refused when it arrives, in
one line; a share keeps the target near share x tokens per crop on every LLaVA-1.5 prompt, a count falls
with the number of images. A FLOPs budget picks among the counts that have a rectangle (`budget_candidates`).
On LLaVA-NeXT a prompt's per-crop target moves with its crop count (3, 4 or 5 per image on the llava-hf
checkpoints) and, for a share, with the image's size, so almost every token budget meets a target without a
rectangle and is refused (llava_next_7b: only counts up to 8 pass); a fixed `tokens` per crop and FLOPs
budgets work there. LLaVA-1.5-7B: counts 64, 128, 192 and the share 0.33 (190 = 10 x 19) are exact; 0.22
(127, a prime) is refused.

LLaVA-NeXT: every crop (base and high-res) is resized to the same grid and the image packed as
[crop tokens..., image_newline] (as the other vision-side methods); the placeholder runs shrink to match
(`methods/_shared/vision_reduce.install_placeholder_shrink`).

FLOPs (MACs): per crop, the patch embedding of rows * cols patches and every CLIP layer over rows * cols
+ 1 tokens (`analytic.vit_resized_macs`); projector and LLM over the delivered count. The resizing and the
position-embedding interpolation are element-wise (not counted).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods import register
from methods._shared.grid import (
    GridReductionMethod,
    content_holder,
    downsample_grid,
    exact_grid,
    grid_refusal,
    nearest_counts,
    reachable_counts,
    record_content,
    resize_share,
)
from methods._shared.vision_reduce import VisionReductionMethod
from methods.base import MethodError


def resize_pixels(pixel_values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, height, width], antialiased bicubic, computed in float32."""
    if tuple(pixel_values.shape[-2:]) == (height, width):
        return pixel_values
    out = F.interpolate(pixel_values.float(), size=(height, width), mode="bicubic", antialias=True,
                        align_corners=False)
    return out.to(pixel_values.dtype)


def one_image_layouts(config, per_crop: int) -> list[tuple[int, int]]:
    """(visual tokens, crops) of every one-image prompt the processor can build: LLaVA-1.5 one crop; LLaVA-NeXT,
    for every grid pinpoint (gh x gw crops of side patches), the base crop + the unpadded grid + one newline
    per row, the unpadding keeping any number of rows or columns (a superset of the layouts
    `harness.efficiency.layouts.visual_tokens_for_image` gives, enumerated instead of searched over sizes)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if getattr(config, "model_type", None) != "llava_next" or not pinpoints:
        return [(per_crop, 1)]
    size = config.vision_config.image_size
    side = math.isqrt(per_crop)
    out = set()
    for bh, bw in pinpoints:
        gh, gw = bh // size, bw // size
        h, w = side * gh, side * gw
        for rows in range(h + 1):
            out.add((per_crop + rows * w + rows, 1 + gh * gw))
        for cols in range(w + 1):
            out.add((per_crop + h * cols + h, 1 + gh * gw))
    return sorted(out)


def unit(geom) -> str:
    return "crop" if geom.family == "llava_next" else "image"


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

    #: visual tokens per image / crop: the image is resized to a grid of exactly this many patches, aspect
    #: ratio <= 2 (null with prompt_tokens null: full size)
    tokens: int | None = None
    #: visual tokens for the whole prompt: a count (> 1) or a share (<= 1) of its visual tokens (overrides
    #: tokens; what budget.kind=tokens sets); each crop's target is then met as `tokens` is
    prompt_tokens: float | None = None

    def delivered(self, k, geom) -> int:
        side = self.side(geom)
        if exact_grid(int(k), side, side) is None:
            why = grid_refusal(int(k), side, side, unit(geom))
            raise MethodError(f"method.params.tokens={int(k)}: {self.name} {why}")
        return int(k)

    # -- the per-prompt budget: exact, or refused in one line
    def validate(self, adapter) -> None:
        self._one_image = one_image_layouts(adapter.model.config, adapter.visual_tokens_per_image)
        super().validate(adapter)

    def target(self, geom, n_visual: int, crops: int, n_images: int) -> int:
        """The budget rule's per-crop target for a prompt (before the grid check)."""
        return VisionReductionMethod.crop_tokens(self, geom, n_visual, crops, n_images)

    def crop_tokens(self, geom, n_visual, crops, n_images) -> int:
        k = self.target(geom, n_visual, crops, n_images)
        side = self.side(geom)
        if exact_grid(k, side, side) is None:  # a prompt the validation did not cover (3 or more images)
            raise MethodError(self.prompt_refusal(geom, k, n_visual, crops, n_images))
        return k

    def prompt_refusal(self, geom, k, n_visual, crops, n_images) -> str:
        side = self.side(geom)
        v = self.prompt_tokens
        shown = f"{int(v)}" if float(v) > 1 else f"{float(v):g}"
        why = grid_refusal(k, side, side, unit(geom))
        return (f"method.params.prompt_tokens={shown}: {self.name} {why}, the per-crop target of budget.value={shown} "
                f"on a prompt of {n_images} image(s), {crops} crop(s), {n_visual} visual tokens"
                f"{self.nearest_budgets(geom)}")

    def checked_prompts(self, geom) -> list[tuple[int, int, int]]:
        """(visual tokens, crops, images) of every prompt of one or two images the validation covers."""
        one = sorted(set(getattr(self, "_one_image", None) or [(geom.visual_per_crop, 1)]))
        out = {(n, c, 1) for n, c in one}
        out |= {(n1 + n2, c1 + c2, 2) for i, (n1, c1) in enumerate(one) for n2, c2 in one[i:]}
        return sorted(out)

    def first_failure(self, geom, value) -> tuple | None:
        """The first checked prompt whose per-crop target for budget `value` has no rectangle, or None."""
        import dataclasses

        from harness.budget import prompt_count

        probe = dataclasses.replace(self, prompt_tokens=value, tokens=None)
        side = self.side(geom)
        cache = self.__dict__.setdefault("_prompts_cache", {})
        if geom not in cache:
            cache[geom] = self.checked_prompts(geom)
        seen = set()
        for n_visual, crops, n_images in cache[geom]:
            newlines = n_images if geom.family == "llava_next" else 0
            key = (prompt_count(value, n_visual), crops, newlines, (n_visual - newlines) // crops)
            if key in seen:  # the same per-crop target as a prompt already checked
                continue
            seen.add(key)
            k = probe.target(geom, n_visual, crops, n_images)
            if exact_grid(k, side, side) is None:
                return k, n_visual, crops, n_images
        return None

    def nearest_budgets(self, geom) -> str:
        """The refusal's tail: for a count, the nearest counts that hold on every checked prompt; for a share on
        LLaVA-1.5, the shares of the nearest per-image counts with a grid; on LLaVA-NeXT, what works instead."""
        v = self.prompt_tokens
        if (v is None or float(v) <= 1) and geom.family == "llava_next":
            return ("; a share's per-crop target varies with the size of a LLaVA-NeXT image (give "
                    "method.params.tokens, a count per crop, or budget.kind=flops)")
        if v is None or float(v) <= 1:
            side = self.side(geom)
            per = geom.visual_per_crop
            k = self.target(geom, per, 1, 1)
            shares = ", ".join(f"{c / per:.4g}" for c in nearest_counts(k, side, side))
            return f"; nearest shares that give one image an exact grid: {shares}" if shares else ""
        T, found = int(v), []
        for direction in (-1, 1):
            t = T + direction
            while max(2, T // 2) <= t <= 2 * T and self.first_failure(geom, t) is not None:
                t += direction
            if max(2, T // 2) <= t <= 2 * T:
                found.append(str(t))
        if found:
            return f"; nearest counts that hold on every prompt of one or two images: {', '.join(found)}"
        return ("; no count within a factor 2 of it does (give method.params.tokens, a count per crop, or "
                "budget.kind=flops)")

    def check_prompt_budget(self, geom) -> None:
        fail = self.first_failure(geom, self.prompt_tokens)
        if fail is not None:
            k, n_visual, crops, n_images = fail
            raise MethodError(self.prompt_refusal(geom, k, n_visual, crops, n_images))

    def budget_candidates(self, adapter) -> list:
        """A FLOPs budget is solved over the per-crop counts that have an exact grid."""
        side = math.isqrt(adapter.visual_tokens_per_image)
        return reachable_counts(side, side)

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
