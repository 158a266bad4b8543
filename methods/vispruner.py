"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025, arXiv 2412.01818; code Theia-4869/VisPruner): keep the tokens the vision
tower's [CLS] attends to most ("important") plus a set of mutually dissimilar tokens from the rest
("diverse"); text-agnostic, once per image / crop, before the projector.

At LLaVA's feature layer (`vision_feature_layer` = -2: CLIP layer L = num_layers - 2), with its patch outputs
x_1..x_P (the features LLaVA projects) and its attention A:

* Important tokens: a_j = (1/H) Σ_heads A_{CLS, j}; with k kept tokens and `important_ratio` r, the
  T_imp = ⌊k·r⌋ patches with the largest a_j.
* Diverse tokens (T_div = k − T_imp): the other patches, ordered by a_j (descending), are thinned by
  repeated similarity-based de-duplication until T_div remain: split the current list alternately into
  A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); for each a ∈ A its redundancy is max_{b∈B} cos(x_a, x_b);
  the r = min(8, R − T_div, |A|) most redundant tokens of A are removed; the list becomes [A's survivors,
  in descending redundancy (the order the official argsort leaves them in), then B]. (The official loop has
  no |A| cap and fails when fewer than r tokens are
  left in A, which only small T_div reach; at the published budgets both are the same.)
* Output per image / crop: the T_imp + T_div kept patches in original order (the official code's index mask).

Defaults: `important_ratio` = 0.5 (the official scripts' default; the README also runs 0.75 at 64 tokens).
Budgets: `tokens` per crop, or the per-prompt `prompt_tokens` that `budget.kind=tokens` sets; no budget
(both null, the default) or a budget of all the tokens keeps them untouched (the documented no-op).

Attention: only the [CLS] row of layer L is computed, from the layer's own q/k (SDPA stays for the attention
itself); the official code asks CLIP for `output_attentions=True` (eager attention maps of every layer).
LLaVA-NeXT: every crop is pruned to the same k and packed as [crop tokens..., image_newline] (`vision_reduce`);
the official NeXT code keeps index masks on each crop's grid through the unpadding instead.

FLOPs per crop (MACs): CLIP layers 0..L over N tokens, later layers over 1 + k; the [CLS] row N·D; per
de-duplication round |A|·|B|·D; projector and LLM over the kept tokens.

Sources: the official code (Theia-4869/VisPruner: `llava/model/llava_arch.py` `encode_images`,
`multimodal_encoder/clip_encoder.py`) and the paper's abstract (arXiv 2412.01818v2: important tokens by visual
attention, then duplicates removed by similarity) were read; the paper's full method section was not available
here, so the code's details (8 per round, alternating split, max-similarity redundancy) are followed.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from methods import register
from methods._shared.tower_output import TowerOutputMethod, cls_attention
from methods._shared.vision_reduce import VisionGeometry
from methods.base import MethodError

#: tokens removed per de-duplication round at most (official code)
ROUND = 8


def dedup_rounds(residual: int, diverse: int) -> list[tuple[int, int, int]]:
    """(|A|, |B|, removed) of each de-duplication round thinning `residual` tokens to `diverse`."""
    out, R = [], int(residual)
    if diverse <= 0:
        return out
    while R > diverse:
        a, b = (R + 1) // 2, R // 2
        r = min(ROUND, R - diverse, a)
        out.append((a, b, r))
        R -= r
    return out


@register
@dataclasses.dataclass
class VisPruner(TowerOutputMethod):
    name = "vispruner"
    noop: ClassVar[dict | None] = {"tokens": None, "prompt_tokens": None}
    example: ClassVar[dict | None] = {"tokens": 20}

    #: kept tokens per image / crop (null: no budget of this kind)
    tokens: int | None = None
    #: kept visual tokens per prompt (count > 1 or share <= 1), per crop as every vision-side method
    prompt_tokens: float | None = None
    #: share of the kept tokens chosen by [CLS] attention (the rest are diverse tokens), in [0, 1]
    important_ratio: float = 0.5

    def check_params(self) -> None:
        self.check_budget_fields()
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise MethodError(f"vispruner: important_ratio must be a number in [0, 1], got {r!r}")

    def split(self, n_keep: int) -> tuple[int, int]:
        important = int(n_keep * float(self.important_ratio))
        return important, int(n_keep) - important

    def check_keep(self, geom: VisionGeometry, n_keep: int) -> None:
        if n_keep > geom.tokens - 1:
            raise MethodError(f"vispruner: {n_keep} tokens exceed the {geom.tokens - 1} patches per image / crop")

    def overhead_macs(self, vit, n_keep: int) -> int:
        important, diverse = self.split(n_keep)
        rounds = dedup_rounds(vit.tokens - 1 - important, diverse)
        return vit.tokens * vit.hidden + sum(a * b * vit.hidden for a, b, _ in rounds)

    def reduce(self, h, q, k, n_keep: int):
        important, diverse = self.split(n_keep)
        x = h[:, 1:]
        B, P, D = x.shape
        score = cls_attention(q, k)[:, :, 1:].mean(dim=1)  # [B, P]
        order = score.argsort(dim=-1, descending=True, stable=True)
        keep, residual = order[:, :important], order[:, important:]
        unit = x / x.norm(dim=-1, keepdim=True)
        for a_n, b_n, r in dedup_rounds(P - important, diverse):
            cur = unit.gather(1, residual[..., None].expand(*residual.shape, D))
            a, b = cur[:, 0::2], cur[:, 1::2]
            redundancy = torch.matmul(a, b.transpose(1, 2)).amax(dim=-1)  # [B, |A|]
            survivors = redundancy.argsort(dim=-1, descending=True, stable=True)[:, r:]
            residual = torch.cat([residual[:, 0::2].gather(1, survivors), residual[:, 1::2]], dim=1)
        if diverse > 0:
            keep = torch.cat([keep, residual], dim=1)
        keep = keep.sort(dim=-1).values
        self.last_selection = keep  # bookkeeping (tests): kept patch indices [B, k]
        if getattr(self, "track_share", False):  # asked-cell recall: each kept token is one patch
            self.last_share = torch.zeros(B, n_keep, P, device=x.device).scatter(2, keep[..., None], 1.0)
        return x.gather(1, keep[..., None].expand(B, n_keep, D))
