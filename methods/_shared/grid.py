"""Grids of visual tokens: the shared pieces of the signal-free baselines `pool` and `downsample`.

Both act on one crop's square patch grid (LLaVA-1.5: the image's 24 x 24; LLaVA-NeXT: each anyres crop's)
and deliver a per-crop count k fixed by the budget rule every vision-side method follows
(`VisionReductionMethod.crop_tokens`: every crop of a prompt gets the same k). They differ in how k is
reached:

* **pooling** (`pool_cells`, `pool_grid`) averages rectangular cells of the H x W grid. The cells follow
  PyTorch's adaptive pooling bins (bin i of n over a side of length L covers [floor(i L / n), ceil((i+1) L / n)),
  so neighbouring cells share a row or column of patches where n does not divide L).
  When k is a perfect square g^2 (or any rows x cols product the rule below picks) this *is*
  `adaptive_avg_pool2d(grid, (rows, cols))`. Otherwise the grid is cut into `rows = round(sqrt(k H / W))`
  bands of rows (adaptive bins), and band i into `w_i = floor((i+1) k / rows) - floor(i k / rows)` column bins
  (adaptive bins of W): rows of w or w + 1 cells, k cells in all, so the count meets the budget exactly
  (e.g. k = 190 of 24 x 24: 14 bands, 8 of 14 cells and 6 of 13);
* **downsampling** (`downsample_grid`) resizes the image to a grid of patches, which must be a rectangle
  of exactly k patches: rows x cols = k with rows <= cols <= 2 rows (aspect ratio at most 2:1), the most
  square such shape (k = 64 -> 8 x 8; 48 -> 6 x 8; 32 -> 4 x 8; 18 -> 3 x 6; 190 -> 10 x 19). A k without
  one (a prime above 2, 10 = 2 x 5, 127, ...) cannot be met: the method refuses such a budget at validation
  (`grid_refusal` names the nearest counts that work), so the count it delivers is always the budget's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def adaptive_bins(length: int, n: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins: n [start, end) ranges over `length` positions."""
    return [((i * length) // n, -(-((i + 1) * length) // n)) for i in range(n)]


def pool_rows(k: int, height: int, width: int) -> list[int]:
    """Cells per band of rows (len = number of bands, sum = k) for k cells over a height x width grid."""
    if not 1 <= k <= height * width:
        raise ValueError(f"cannot pool a {height}x{width} grid to {k} cells")
    rows = int(round(math.sqrt(k * height / width)))
    rows = max(rows, -(-k // width), 1)
    rows = min(rows, height, k)
    return [((i + 1) * k) // rows - (i * k) // rows for i in range(rows)]


def pool_cells(k: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The k cells (row start, row end, col start, col end) of the pooled grid, in row-major order."""
    cells = []
    widths = pool_rows(k, height, width)
    for (r0, r1), w in zip(adaptive_bins(height, len(widths)), widths):
        cells += [(r0, r1, c0, c1) for c0, c1 in adaptive_bins(width, w)]
    return cells


def pool_grid(x: torch.Tensor, height: int, width: int, k: int) -> torch.Tensor:
    """x [N, height*width, D] (row-major grid) averaged over the k cells of `pool_cells`: [N, k, D]."""
    N, n, D = x.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not form a {height}x{width} grid")
    grid = x.transpose(1, 2).reshape(N, D, height, width)
    widths = pool_rows(k, height, width)
    if len(set(widths)) == 1:  # a rows x cols rectangle: one adaptive pooling
        out = F.adaptive_avg_pool2d(grid, (len(widths), widths[0]))
        return out.flatten(2).transpose(1, 2)
    parts = []
    for (r0, r1), w in zip(adaptive_bins(height, len(widths)), widths):
        parts.append(F.adaptive_avg_pool2d(grid[:, :, r0:r1], (1, w)).flatten(2))
    return torch.cat(parts, dim=2).transpose(1, 2)


#: the largest aspect ratio (long side / short side) a downsampled grid may have
MAX_ASPECT = 2


def exact_grid(k: int, height: int, width: int) -> tuple[int, int] | None:
    """(rows, cols) with rows * cols == k, rows <= cols <= MAX_ASPECT * rows, cols <= width, rows <= height,
    the most square of them; the crop's own height x width for k >= height * width; None if there is none."""
    if k < 1:
        return None
    if k >= height * width:
        return height, width
    for rows in range(math.isqrt(k), 0, -1):  # the largest divisor <= sqrt(k) is the most square shape
        if k % rows == 0:
            cols = k // rows
            if cols <= MAX_ASPECT * rows and cols <= width and rows <= height:
                return rows, cols
            return None  # smaller divisors only stretch the shape further
    return None


def downsample_grid(k: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of patches a crop is resized to for k tokens per crop (`exact_grid`); ValueError if no
    rectangle of exactly k patches has an aspect ratio <= MAX_ASPECT (callers refuse such budgets first)."""
    grid = exact_grid(k, height, width)
    if grid is None:
        raise ValueError(grid_refusal(k, height, width))
    return grid


def reachable_counts(height: int, width: int) -> list[int]:
    """Every per-crop count `exact_grid` can deliver on a height x width crop, ascending."""
    return [k for k in range(1, height * width + 1) if exact_grid(k, height, width) is not None]


def nearest_counts(k: int, height: int, width: int) -> list[int]:
    """The reachable per-crop counts nearest k: the largest below it and the smallest above it."""
    ok = reachable_counts(height, width)
    below = [c for c in ok if c < k]
    above = [c for c in ok if c > k]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def grid_refusal(k: int, height: int, width: int, unit: str = "image") -> str:
    """Why k patches per crop cannot be delivered, naming the nearest counts that can (one line)."""
    near = ", ".join(f"{c} = {'x'.join(map(str, exact_grid(c, height, width)))}"
                     for c in nearest_counts(k, height, width))
    return (f"cannot resize to exactly {k} patches per {unit} with an aspect ratio <= {MAX_ASPECT} "
            f"(nearest: {near})")


# ---- the Method plumbing `pool` and `downsample` share ------------------------------------------------
from methods._shared.vision_reduce import VisionGeometry, VisionReductionMethod  # noqa: E402
from methods.base import MethodError  # noqa: E402


class GridReductionMethod(VisionReductionMethod):
    """Base of the signal-free grid baselines: one count k per crop, reached at one place (after the
    projector: `pool`; at the tower's input: `downsample`) instead of over CLIP layers.

    Reuses the vision-side plumbing (`VisionReductionMethod`): the per-prompt budget rule (`crop_tokens`),
    the reduced LLaVA-NeXT packing and the placeholder shrinking, the token counts of a layout. The
    plumbing's per-layer `schedule` is here `{last useful layer: tokens removed per crop}` (one entry, or
    none when nothing is removed), the form its counts read. Subclasses (dataclasses with the fields
    `tokens` and `prompt_tokens`) implement `delivered(k, geom)` (the count a per-crop target k gives: k,
    or a one-line MethodError where the method cannot deliver exactly k), `install(model, adapter, geom,
    state)` and `grid_prefill_macs`."""

    refusals = {
        "qwen2_vl": "its processor already resizes every image to its own pixel budget and packs the patches of "
        "all images into one sequence with a 2x2 merger, so a fixed per-crop grid does not exist",
        "qwen2_5_vl": "its processor already resizes every image to its own pixel budget and packs the patches of "
        "all images into one sequence with a 2x2 merger, so a fixed per-crop grid does not exist",
        "llava_onevision": "its anyres_max packing interpolates each image's unpadded feature grid, which a "
        "per-crop grid of another size no longer forms",
    }

    # -- the per-crop count
    def delivered(self, k: int, geom: VisionGeometry) -> int:
        """Visual tokens a crop really delivers for a target of k (pool: k)."""
        return k

    def crop_tokens(self, geom, n_visual, crops, n_images) -> int:
        return self.delivered(super().crop_tokens(geom, n_visual, crops, n_images), geom)

    def check_tokens(self) -> None:
        v = self.prompt_tokens
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (v > 1 and int(v) != v)):
            raise MethodError(f"{self.name}: prompt_tokens must be a share in (0, 1] or a whole count > 1, got {v!r}")
        t = self.tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise MethodError(f"{self.name}: tokens must be a positive integer (visual tokens per crop), got {t!r}")
        if t is not None and v is not None:
            raise MethodError(f"{self.name}: give either prompt_tokens or tokens, not both")

    def check_params(self) -> None:
        self.check_tokens()

    def budget_token_params(self, value: float) -> dict:
        return {"prompt_tokens": int(value) if float(value) > 1 else float(value), "tokens": None}

    def schedule(self, geom: VisionGeometry) -> dict[int, int]:
        if self.tokens is None:
            return {}
        if self.tokens > geom.visual_per_crop:
            raise MethodError(
                f"{self.name}: tokens={self.tokens} exceeds the {geom.visual_per_crop} visual tokens per crop"
            )
        removed = geom.visual_per_crop - self.delivered(self.tokens, geom)
        return {geom.last_useful: removed} if removed else {}

    def schedule_for(self, geom: VisionGeometry, k: int) -> dict[int, int]:
        removed = geom.visual_per_crop - int(k)
        return {geom.last_useful: removed} if removed else {}

    def validate(self, adapter) -> None:
        super().validate(adapter)
        side = int(math.isqrt(self._geom.visual_per_crop))
        if side * side != self._geom.visual_per_crop:
            raise MethodError(
                f"method {self.name!r}: the {self._geom.visual_per_crop} visual tokens per crop do not form a square "
                "patch grid (vision_feature_select_strategy must drop the CLS token)"
            )

    def side(self, geom: VisionGeometry) -> int:
        return math.isqrt(geom.visual_per_crop)

    # -- patching
    def install(self, model, adapter, geom: VisionGeometry, state: dict) -> None:
        """Patch the model so that a crop delivers `state["k"]` tokens (set before the tower runs)."""
        raise NotImplementedError

    def apply(self, model, adapter):
        from methods._shared.vision_reduce import install_placeholder_shrink

        self.validate(adapter)
        geom = self._geom
        if not self.per_prompt:
            k = geom.visual_per_crop - sum(self.schedule(geom).values())
            if k == geom.visual_per_crop:
                return model  # nothing removed: the model is left untouched (identical logits)
            state = {"k": k}
            self.install(model, adapter, geom, state)
            install_placeholder_shrink(model, adapter, k)
            return model
        state = {"k": None}

        def per_crop(n_visual, crops, n_images):
            return self.crop_tokens(geom, n_visual, crops, n_images)

        self.install(model, adapter, geom, state)
        install_placeholder_shrink(model, adapter, per_crop, lambda k: state.__setitem__("k", int(k)))
        return model

    # -- analytic FLOPs
    def grid_prefill_macs(self, shapes, geom: VisionGeometry, passes: int, k: int) -> tuple[int, int]:
        """(vision MACs, projector MACs) of `passes` crops delivering k tokens each."""
        raise NotImplementedError

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        from harness.efficiency.analytic import dense_prefill_macs, lm_head_macs, llm_prefill_macs

        geom = self._geom or VisionGeometry.from_shapes(shapes)
        if not self.per_prompt and not self.schedule(geom):
            return dense_prefill_macs(shapes, layout)
        passes, projected, visual = self.reduced_layout_counts(layout, geom)
        k = projected // passes if passes else geom.visual_per_crop
        vision, projector = self.grid_prefill_macs(shapes, geom, passes, k)
        return {
            "vision": vision,
            "projector": projector,
            "llm": llm_prefill_macs(shapes.llm, layout.text + visual),
            "lm_head": lm_head_macs(shapes.llm, 1),
        }


# ---- content bookkeeping (asked-cell recall on `shapes`, harness/recall.py) ----------------------------------
def content_holder(model):
    """The vision-side bookkeeping holder of this model instance (`vision_reduce._PATCHED`, what
    `harness.recall` reads), created for methods that reduce without patching CLIP layers."""
    from methods._shared.vision_reduce import _PATCHED, _Holder

    holder = getattr(model, _PATCHED, None)
    if holder is None:
        holder = _Holder()
        object.__setattr__(model, _PATCHED, holder)
    return holder


def record_content(holder, share: torch.Tensor, batch: int) -> None:
    """Record what the last vision call delivered: `share` [k, n] (row t: the share of each of the crop's n
    original patches in delivered token t, rows summing to 1; k = 0 for none), the same for each of the
    `batch` crops. Stored as a `VisionState` with the CLS token at index 0 (as the CLIP reducers keep it).
    Only while `holder.track` is on (recall measurement), like the reducers' own bookkeeping."""
    from methods._shared.vision_reduce import VisionState

    if not holder.track:
        return
    k, n = share.shape
    source = torch.zeros(batch, k + 1, n + 1)
    source[:, 0, 0] = 1.0
    source[:, 1:, 1:] = share.float()
    holder.last = VisionState(size=torch.ones(batch, k + 1), pos=torch.zeros(batch, k + 1, dtype=torch.long),
                              source=source, track=True)


def pool_share(k: int, height: int, width: int) -> torch.Tensor:
    """[k, height*width]: pooled token t is the mean of its cell's patches (1 / |cell| each)."""
    share = torch.zeros(k, height * width)
    for t, (r0, r1, c0, c1) in enumerate(pool_cells(k, height, width)):
        for r in range(r0, r1):
            share[t, r * width + c0:r * width + c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    return share


def resize_share(rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """[rows*cols, height*width]: a patch of the image resized to rows x cols patches covers a rectangle of
    the original height x width patch grid; its share of each original patch is the overlapping area over the
    rectangle's area (the footprint the resampling averages, rows summing to 1)."""
    def overlaps(n_new, n_old):
        step = n_old / n_new
        out = torch.zeros(n_new, n_old)
        for i in range(n_new):
            lo, hi = i * step, (i + 1) * step
            for j in range(n_old):
                out[i, j] = max(0.0, min(hi, j + 1) - max(lo, j)) / step
        return out

    return torch.einsum("ar,bc->abrc", overlaps(rows, height), overlaps(cols, width)).reshape(rows * cols, -1)
