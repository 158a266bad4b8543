"""Asked-cell recall on `shapes`: how much of the asked grid cell's visual content reaches each LLM layer.

For a `shapes` question about one named cell ("... in row 2, column 3?": colour, shape and letter
questions), the cell's 48x48 px square covers a known set of ViT patches (3x3 of the 12x12 grid of the
192 px image at 16 px, or the equivalent overlap weights on another patch grid). Per sample and per LLM
layer, the recall is the asked patches' weight carried by the visual tokens alive at that layer's input,
over their total weight: a kept token counts fully, a dropped one not at all. It is read from what the
patched model did in that generation (the LLM reducer's per-layer kept indices,
`methods._shared.llm_reduce.ReduceState.cache_idx`), never re-derived from a method's formula. A token
frozen by ShortV or hollowed / FFN-reduced by RedundancyLens is alive (its K/V reach the layer's text
queries) and counts fully.

Not measured (recall None, the table shows "-"): questions about no single cell (position, count),
LLaVA-NeXT (anyres crops map patches to tokens differently), and methods that *merge* tokens (ToMe,
FiCoCo-V/L/VL): their bookkeeping keeps each merged token's size and first patch, not the share of each
patch it holds, so the proportional rule cannot be read from it yet.
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


def measurable(model, adapter) -> bool:
    """False where the method's bookkeeping cannot give the recall (see the module docstring)."""
    from methods._shared import llm_reduce as LR
    from methods._shared.vision_reduce import _PATCHED

    if adapter.family != "llava" or getattr(model, _PATCHED, None) is not None:
        return False
    red = LR.get_reducer(model)
    if red is not None and type(red.plan).after_attention is not LR.ReductionPlan.after_attention:
        return False  # a merging plan (FiCoCo-L): kept tokens carry merged content
    return True


def layer_recall(model, adapter, input_ids, questions: list[str]) -> list[list[float] | None]:
    """Per sample of the last generate call (prompt ids `input_ids` [B, P]): the asked-cell recall at the
    input of every LLM layer, or None where it is not measured."""
    import math

    import torch

    from methods._shared import llm_reduce as LR

    B = input_ids.shape[0]
    if not measurable(model, adapter):
        return [None] * B
    L = adapter.num_llm_layers
    visual = adapter.visual_mask(input_ids)  # [B, P] as the processor inserted them
    n_vis = int(visual[0].sum())
    side = math.isqrt(n_vis)
    if side * side != n_vis:  # several images or a layout we cannot map: not measured
        return [None] * B
    red = LR.get_reducer(model)
    st = red.state if red is not None else None
    out: list[list[float] | None] = []
    for b, q in enumerate(questions):
        cell = asked_cell(q)
        if cell is None:
            out.append(None)
            continue
        weights = cell_patch_weights(cell, side)
        total = sum(weights.values())
        pos = visual[b].nonzero().squeeze(1)  # prefill index of visual ordinal k (row-major patch k)
        per_layer = []
        for i in range(L):
            idx = st.cache_idx[i] if st is not None and st.cache_idx and st.P == input_ids.shape[1] else None
            if idx is None:  # nothing removed before this layer: every visual token is alive
                per_layer.append(1.0)
                continue
            alive = torch.zeros(input_ids.shape[1], dtype=torch.bool)
            alive[idx[b].cpu()] = True
            kept = alive[pos.cpu()]
            per_layer.append(sum(w for k, w in weights.items() if bool(kept[k])) / total)
        out.append(per_layer)
    return out


def summarize(per_sample: dict[str, list[float] | None]) -> dict | None:
    """{"mean": mean over measured samples of the mean over layers, "per_layer": [...], "n": samples}."""
    rows = [v for v in per_sample.values() if v]
    if not rows:
        return None
    L = len(rows[0])
    per_layer = [sum(r[i] for r in rows) / len(rows) for i in range(L)]
    return {"mean": sum(per_layer) / L, "per_layer": per_layer, "n": len(rows)}
