"""Asked-object recall on `shapes`: how much of the asked object's pixels reach each LLM layer.

For a `shapes` question about one named cell ("... in row 2, column 3?": colour, shape and letter
questions), the generator tells which pixels of the image are the asked object
(`harness.benchmarks.shapes.object_mask`: the non-background pixels of that cell). Their share in each
ViT patch (`object_patch_weights`: the 12x12 grid of the 192 px image at 16 px, or the pixel overlaps on
another patch grid, the image being resized as a whole) weights the patches. Per sample and per LLM layer,
the recall is the share of the object's pixels carried by the visual tokens alive at that layer's input:
a kept token counts fully, a dropped one not at all, a merged token by the object's share of it (below).
An object lying 97 % in one patch thus scores 0.97 when only that patch survives, however the rest of
its cell fares. Without the image (a caller that passes no masks) the cell's 48x48 px square stands in
(`cell_patch_weights`, every pixel of the cell counting).

It is read from what the patched model did in that generation (the LLM reducer's per-layer kept indices,
`methods._shared.llm_reduce.ReduceState.cache_idx`), never re-derived from a method's formula. A token
frozen by ShortV or hollowed / FFN-reduced by RedundancyLens is alive (its K/V reach the layer's text
queries) and counts fully.

Only the layers after the method acts count: the per-layer list holds None for the layers before the
first one a reduction changed (FastV at K=2: layers 0-1; FiCoCo-L: up to its first merge); a vision-side
reduction (and `blind`, `pool`, `downsample`) acts before layer 0; a method that never removes or merges a
token (none, ShortV, RedundancyLens) counts every layer. `summarize` averages the counted layers.

A token merged in the vision encoder counts in proportion to the object's share of it: the encoder's
merge bookkeeping (`VisionState.source`, kept while recall is measured, `track`) holds the share of each
original patch in every token, updated by each reducer with its own merge weights (ToMe: the
size-weighted average, so a token of size s holding one asked patch carries 1/s of it; FiCoCo-V: the
compress weights alpha of eq. 3, the kept token's own share 1/(1 + sum alpha)).

The signal-free baselines keep the same bookkeeping without patching CLIP (`methods/_shared/grid.py`): a
`pool` token holds 1/|cell| of each patch of its cell, a `downsample` patch the overlapping area of each
original patch over its footprint, and `blind` delivers no token (recall 0).

Tokens merged inside the LLM by FiCoCo-L (and FiCoCo-VL's LLM stage, SparseVLM's recycling) count the
same way: the reducer logs each merge's discarded tokens, targets and weights (`ReduceState.merges`), and
a target holds 1 / (1 + sum of its weights) of itself and each weight's share of a discarded token, from
the next layer on.

Not measured (recall None, the table shows "-"): questions about no single cell (position, count) and
LLaVA-NeXT (anyres crops map patches to tokens differently).
"""
from __future__ import annotations

import re

IMAGE = 192  # shapes image side (px)
GRID = 4     # cells per side
_WHERE = re.compile(r"row (\d+), column (\d+)")


def asked_cell(question: str) -> int | None:
    """The row-major index of the cell a `shapes` question names, or None (position/count questions)."""
    m = _WHERE.search(question or "")
    if not m:
        return None
    r, c = int(m.group(1)) - 1, int(m.group(2)) - 1
    return r * GRID + c if 0 <= r < GRID and 0 <= c < GRID else None


def cell_patch_weights(cell: int, side: int) -> dict[int, float]:
    """{row-major patch index: share of the patch's area inside `cell`} on a `side` x `side` patch grid
    of the square image (12x12 for the tiny model: the cell's 3x3 patches with weight 1)."""
    r, c = divmod(cell, GRID)
    lo_r, hi_r = r * IMAGE / GRID, (r + 1) * IMAGE / GRID
    lo_c, hi_c = c * IMAGE / GRID, (c + 1) * IMAGE / GRID
    step = IMAGE / side

    def overlap(i, lo, hi):
        return max(0.0, min(hi, (i + 1) * step) - max(lo, i * step)) / step

    out = {}
    for i in range(side):
        wr = overlap(i, lo_r, hi_r)
        if not wr:
            continue
        for j in range(side):
            wc = overlap(j, lo_c, hi_c)
            if wc:
                out[i * side + j] = wr * wc
    return out


def object_patch_weights(mask, side: int) -> dict[int, float]:
    """{row-major patch index: share of the object's pixels in that patch} on a `side` x `side` patch grid
    over the whole image; `mask` [H, W]: the object's pixels (1) or coverage in [0, 1]. Pixels are split
    between patches by their overlap when the grid does not divide the image. Empty mask: {}."""
    import numpy as np

    m = np.asarray(mask, dtype=np.float64)
    total = float(m.sum())
    if total <= 0:
        return {}

    def overlap(n_px):  # [n_px, side]: share of pixel i's extent inside patch j
        edges = np.arange(side + 1) * n_px / side
        lo, hi = np.arange(n_px)[:, None], np.arange(1, n_px + 1)[:, None]
        return np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0, None)

    w = overlap(m.shape[0]).T @ m @ overlap(m.shape[1]) / total  # [side, side]
    return {int(i): float(v) for i, v in enumerate(w.ravel()) if v > 0}


def acting_layer(model, adapter, state) -> int:
    """The first LLM layer whose input a reduction changed in the last prefill: 0 for a vision-side (or
    grid / blind) reduction, the first layer with dropped tokens, or the layer after the first merge; 0
    where nothing was removed or merged (every layer counts)."""
    from methods._shared.vision_reduce import _PATCHED

    if getattr(model, _PATCHED, None) is not None:
        return 0
    if state is None:
        return 0
    first = [i + 1 for i in state.merges] if state.merges else []
    first += [i for i, idx in enumerate(state.cache_idx or []) if idx is not None]
    return min(first) if first else 0


def asked_object_mask(doc, question: str):
    """The asked object's pixels of a `shapes` doc (`shapes.object_mask` on its image), or None where the
    question names no cell or the doc has no image."""
    from harness.benchmarks.shapes import object_mask

    cell = asked_cell(question)
    image = doc.get("image") if isinstance(doc, dict) else None
    if cell is None or image is None or not hasattr(image, "convert"):
        return None
    return object_mask(image, cell)


def track(model, on: bool) -> None:
    """Turn the vision encoder's content bookkeeping (`VisionState.source`, ToMe) on while answers are
    generated and recall is measured, off before anything is timed. No-op without a vision reduction."""
    from methods._shared.vision_reduce import _PATCHED

    holder = getattr(model, _PATCHED, None)
    if holder is not None:
        holder.track = bool(on)


def measurable(model, adapter) -> bool:
    """False where the method's bookkeeping cannot give the recall (see the module docstring)."""
    from methods._shared import llm_reduce as LR

    if adapter.family != "llava":
        return False
    return True


def _vision_content(model, B: int, n_vis: int):
    """[B, n_vis, n_vis] share of each original patch in each visual token entering the LLM, from the
    vision encoder's merge bookkeeping of the last call; the identity without a vision reduction; None
    where a reduction ran without content bookkeeping (tracking off) or the shapes do not match."""
    import torch

    from methods._shared.vision_reduce import _PATCHED, last_vision_state

    if getattr(model, _PATCHED, None) is None:
        return torch.eye(n_vis).expand(B, n_vis, n_vis)
    st = last_vision_state(model)
    if st is None or st.size is None:  # no token was merged in the last call
        return torch.eye(n_vis).expand(B, n_vis, n_vis) if st is not None and len(st.pos[0]) == n_vis + 1 else None
    if st.source is None or st.source.shape[0] != B:
        return None
    src = st.source[:, 1:, 1:].float().cpu()  # drop CLS (LLaVA's "default" feature selection)
    return src if src.shape[2] == n_vis else None


def layer_recall(model, adapter, input_ids, questions: list[str], masks: list | None = None) -> list[list[float | None] | None]:
    """Per sample of the last generate call (prompt ids `input_ids` [B, P], as the processor made them):
    the asked object's recall at the input of every LLM layer (None for the layers before the method
    acts), or None where it is not measured. `masks`: per sample the asked object's pixels
    (`shapes.object_mask`), or None: the asked cell's square stands in."""
    import math

    import torch

    from methods._shared import llm_reduce as LR

    B = input_ids.shape[0]
    if not measurable(model, adapter):
        return [None] * B
    L = adapter.num_llm_layers
    n_vis = int(adapter.visual_tokens_per_image)  # patches of the image (the processor's count, one image)
    side = math.isqrt(n_vis)
    if side * side != n_vis or bool((adapter.visual_mask(input_ids).sum(1) != n_vis).any()):
        return [None] * B  # several images or a layout we cannot map: not measured
    content = _vision_content(model, B, n_vis)  # token k entering the LLM holds content[b, k, p] of patch p
    if content is None:
        return [None] * B
    red = LR.get_reducer(model)
    st = red.state if red is not None else None
    if st is not None and (st.visual is None or st.visual.shape[0] != B):
        st = None  # no prefill of this batch went through the reducer (nothing reduced in the LLM)
    start = acting_layer(model, adapter, st)
    out: list[list[float | None] | None] = []
    for b, q in enumerate(questions):
        cell = asked_cell(q)
        mask = masks[b] if masks is not None else None
        share = object_patch_weights(mask, side) if mask is not None else cell_patch_weights(cell, side) if cell is not None else {}
        if cell is None or not share:
            out.append(None)
            continue
        weights = torch.zeros(n_vis)
        for p, w in share.items():
            weights[p] = w
        per_token = content[b] @ weights  # asked content carried by each visual token entering the LLM
        total = float(weights.sum())
        n_in = per_token.shape[0]
        per_layer = []
        merges = st.merges if st is not None else {}
        for i in range(L):
            if merges:  # merging plan (FiCoCo-L): the alive visual tokens are the merge targets
                per_layer.append(float(per_token.sum()) / total)
                if i in merges:  # merged after layer i's attention: the input of layer i+1 holds the mix
                    disc, tgt, alpha = (t[b].cpu() for t in merges[i])
                    per_token = (per_token[tgt] + alpha.t() @ per_token[disc]) / (1 + alpha.sum(0))
                continue
            idx = st.cache_idx[i] if st is not None and st.cache_idx else None
            if idx is None:  # nothing removed before this layer: every visual token entering the LLM is alive
                per_layer.append(float(per_token.sum()) / total)
                continue
            visual = st.visual[b].cpu()
            alive = torch.zeros(visual.shape[0], dtype=torch.bool)
            alive[idx[b].cpu()] = True
            kept = alive[visual.nonzero().squeeze(1)]  # by visual ordinal
            assert kept.shape[0] == n_in
            per_layer.append(float(per_token[kept].sum()) / total)
        out.append([None if i < start else v for i, v in enumerate(per_layer)])
    return out


def summarize(per_sample: dict[str, list[float | None] | None]) -> dict | None:
    """{"mean": mean over measured samples of the mean over their counted layers (those after the method
    acts), "per_layer": per layer the mean over the samples counting it (None: none does), "n": samples}."""
    rows = [v for v in per_sample.values() if v and any(x is not None for x in v)]
    if not rows:
        return None
    L = len(rows[0])
    per_layer = []
    for i in range(L):
        vals = [r[i] for r in rows if r[i] is not None]
        per_layer.append(sum(vals) / len(vals) if vals else None)
    means = [sum(x for x in r if x is not None) / sum(x is not None for x in r) for r in rows]
    return {"mean": sum(means) / len(means), "per_layer": per_layer, "n": len(rows)}
