"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025; code vbdi/divprune): keep the most diverse subset of the visual tokens, chosen as a max-min
diversity problem (MMDP) over their embeddings; text-agnostic, once, at the LLM's input.

For the prompt's n visual embeddings e_1..e_n as they enter the LLM (after the projector), with the cosine
distance d(i, j) = 1 − e_i·e_j / (|e_i| |e_j|), MMDP asks for the subset S, |S| = k, maximising
min_{i≠j ∈ S} d(i, j). DivPrune solves it greedily (the paper's algorithm, as the official code runs it):

* first token: the one whose nearest other token is farthest, argmax_j min_{i≠j} d(i, j);
* then, k − 1 times: the token farthest from the chosen set, argmax_j min_{s∈S} d(s, j) (ties: the
  lowest index), added to S.

The kept tokens stay in their original order; the other visual tokens are removed before decoder layer 0
(`methods._shared.llm_reduce`, as `random` does), so every layer runs on, and caches, the kept tokens only.
Positions: `keep` (default; kept tokens keep their RoPE positions, the only choice on M-RoPE) or `renumber`
(contiguous: what the official LLaVA code gets, since it drops the tokens from the input embeddings and
LLaVA then numbers the shortened sequence 0..n'−1).

Budgets: `keep` tokens or `keep_ratio` of the prompt's visual tokens (official: `SUBSET_RATIO`, kept =
round(ratio · n), default 0.098 -> 56 of 576); `budget.kind=tokens` sets them per prompt, `budget.kind=flops`
(the paper states its budgets as a TFLOPs ratio) is solved over `keep`. Scope: the prompt's visual tokens
together (all images, all LLaVA-NeXT crops and newline tokens: the official code selects over the first
image's whole packed feature sequence, newlines included, and handles only one image at batch size 1).

Families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL (no [CLS] token is needed: the signal
is the embeddings themselves; on Qwen's M-RoPE the kept tokens keep their (t, h, w) positions).

FLOPs: the cosine matrix n·n·d MACs (d the LLM hidden size; the greedy loop only takes minima) plus the LLM
over the kept tokens; vision tower and projector are dense.

Sources: the official code (vbdi/divprune: `LLaVA/llava/model/llava_arch.py` `DivPrune`, `tflops.py`,
`run_Divprune.sh`) and its README were read; the paper's full text was not available here. The greedy above is
the code's; the one difference is that chosen tokens are excluded explicitly (the code relies on d(s, s) = 0).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


def mmdp_greedy(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset of the rows of emb [n, d]: the k chosen row indices, ascending."""
    n = emb.shape[0]
    unit = emb.float() / emb.float().norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.matmul(unit, unit.transpose(0, 1))  # [n, n]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=0)  # each token's nearest other token
    # tensors throughout (no Python ints): a traced count (fvcore) keeps the selection, matmul included
    j = nearest.argmax(dim=0, keepdim=True)
    chosen = [j]
    ids = torch.arange(n, device=emb.device)
    taken = ids == j
    to_set = dist.index_select(0, j)[0]
    for _ in range(k - 1):
        j = to_set.masked_fill(taken, float("-inf")).argmax(dim=0, keepdim=True)
        chosen.append(j)
        taken = taken | (ids == j)
        to_set = torch.minimum(to_set, dist.index_select(0, j)[0])
    return torch.cat(chosen).sort().values


def kept_visual(n_visual: int, keep_ratio: float, keep: int | None) -> int:
    if keep is not None:
        return min(int(keep), n_visual)
    return min(n_visual, int(round(n_visual * keep_ratio)))


class _DivPrunePlan(LR.ReductionPlan):
    first_layer = 0

    def __init__(self, keep_ratio, keep, positions):
        self.keep_ratio, self.keep, self.positions = keep_ratio, keep, positions

    def before_layer(self, view):
        if view.layer != 0:
            return None
        visual = view.visual
        nv = LR.equal_visual_count(visual, "divprune")
        n_keep = kept_visual(nv, self.keep_ratio, self.keep)
        if n_keep >= nv or nv == 0:
            return None
        scores = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        self.last_selection = []  # bookkeeping (tests): kept visual ordinals per sample
        for b in range(visual.shape[0]):
            where = visual[b].nonzero()[:, 0]
            chosen = mmdp_greedy(view.hidden[b, where], n_keep)
            self.last_selection.append(chosen)
            scores[b] = scores[b].index_fill(0, where[chosen], 1.0)
        return LR.keep_top_visual(scores, visual, n_keep)


@register
@dataclasses.dataclass
class DivPrune(Method):
    name = "divprune"
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "keep"
    budget_param = "keep"
    noop: ClassVar[dict | None] = {"keep_ratio": 1.0, "keep": None}
    example: ClassVar[dict | None] = {"keep_ratio": 0.3, "keep": None}

    #: share of the prompt's visual tokens kept, in (0, 1] (official default 0.098); 1.0 is the no-op
    keep_ratio: float = 0.098
    #: visual tokens kept per prompt (overrides keep_ratio when set)
    keep: int | None = None
    #: "keep" original RoPE positions or "renumber" them contiguously (official LLaVA code)
    positions: str = "keep"

    def check_params(self) -> None:
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise MethodError(f"divprune: keep_ratio must be in (0, 1], got {r!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise MethodError(f"divprune: keep must be an integer >= 1 (visual tokens kept), got {self.keep!r}")
        if self.positions not in ("keep", "renumber"):
            raise MethodError(f"divprune: positions must be 'keep' or 'renumber', got {self.positions!r}")

    def reduces(self) -> bool:
        return self.keep is not None or float(self.keep_ratio) < 1.0

    def validate(self, adapter) -> None:
        super().validate(adapter)
        if self.reduces():
            self.require_full_attention(adapter)
        if self.positions == "renumber" and getattr(adapter, "position_streams", 1) > 1:
            raise MethodError(
                f"divprune: positions='renumber' is defined for 1-D RoPE, not {adapter.family}'s M-RoPE; use positions='keep'"
            )
        if self.keep is not None and adapter.family == "llava" and self.keep > adapter.visual_tokens_per_image:
            raise MethodError(
                f"divprune: keep={self.keep} exceeds the {adapter.visual_tokens_per_image} visual tokens per image"
            )

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"keep": int(value)}
        return {"keep": None, "keep_ratio": float(value)}

    def visual_tokens_kept(self, layout) -> int:
        return kept_visual(layout.visual, float(self.keep_ratio), self.keep)

    def apply(self, model, adapter):
        self.validate(adapter)
        if not self.reduces():
            return model
        self._plan = _DivPrunePlan(float(self.keep_ratio), self.keep, self.positions)
        LR.install(model, adapter, self._plan)
        return model

    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """Kept visual tokens at every layer's input (dropped before layer 0) and the cosine matrix's MACs."""
        kept = self.visual_tokens_kept(layout)
        if kept >= layout.visual:
            return None
        return [kept] * shapes.llm.layers, layout.visual * layout.visual * shapes.llm.hidden

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
