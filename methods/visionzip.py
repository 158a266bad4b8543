"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025; code dvlab-research/VisionZip): keep the tokens the vision tower's feature layer concentrates
its attention on, merge the rest into a few contextual tokens; text-agnostic, once per image / crop,
before the projector.

At LLaVA's feature layer (`vision_feature_layer` = -2, i.e. CLIP layer L = num_layers - 2), with its output
h (N = 1 + P tokens, CLS first), its attention A = softmax(Q Kᵀ / √d_h) and its keys K:

* Dominant tokens: s_j = Σ_heads A_{CLS, j} over the P patches; the `dominant` tokens with the largest s_j
  are kept as they are. `cls_token=true` (the official code, which the published numbers come from): the
  [CLS] token itself is one of the `dominant` tokens (its hidden state is fed to the LLM, first), so
  `dominant - 1` patches are chosen; `false`: `dominant` patches.
* Contextual tokens: the M remaining patches, in original order, are compared by their keys averaged over
  the heads, k̄_j = (1/H) Σ_h K_{h,j}, normalised to unit length. `contextual` target tokens are taken
  uniformly (every ⌊M / contextual⌋-th remaining token, the first `contextual` of them); every other
  remaining token joins the target whose k̄ is most similar (largest cosine; ties: the first target), and
  a contextual token is h_target + mean(h of the tokens that joined it) (the official code's merge; a
  target that nobody joined stays h_target).
* Output per image / crop: dominant tokens in original order (CLS first), then the contextual tokens in
  target order: `dominant + contextual` tokens.

Budget -> split: the published splits 54+10 / 108+20 / 162+30 for 64 / 128 / 192 tokens are
contextual = round(5k / 32) (halves round up), dominant = k - contextual; the same rule maps every other
budget k (a `tokens` count per crop, or the per-prompt `prompt_tokens` that `budget.kind=tokens` sets),
e.g. 16 -> 14+2, 20 -> 17+3, 3 -> 3+0. `dominant` and `contextual` set the split directly. No budget
(all four null, the default) or a budget of all the tokens (k = 576) keeps them untouched (the documented no-op).

Attention: only the [CLS] row of layer L is computed, from the layer's own q/k (B·H·N·d_h MACs; SDPA stays
for the attention itself). The official code instead patches every CLIP layer to return eager attention maps
(`output_attentions=True`) and a per-layer key mean. LLaVA-NeXT: every anyres crop is reduced to the same k
and packed as [crop tokens..., image_newline] (`vision_reduce`); the official NeXT code puts the dominant
tokens back in their grid cells before unpadding and appends the contextual ones, which differs. No
projector fine-tuning (the paper's optional "VisionZip ‡" variant) is done here.

FLOPs per crop (MACs): CLIP layers 0..L over N tokens, later layers over 1 + k; the [CLS] row N·D; the
similarity of the M − c merged tokens to the c targets (M − c)·c·d_h; projector and LLM over the kept tokens.

Sources: the official code (dvlab-research/VisionZip: `visionzip/clip_encoder.py`, `utils.py`) was read; the
paper's full text was not available here (only summaries: CLS-attention dominant tokens, similarity-merged
contextual tokens, text-agnostic), so where the two could differ (the [CLS] token counted among the dominant
tokens, target + mean merge) the code, which produced the published tables, is followed and named.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from methods import register
from methods._shared.tower_output import TowerOutputMethod, cls_attention
from methods._shared.vision_reduce import VisionGeometry
from methods.base import MethodError


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) for k kept tokens: contextual = round(5k/32) (54+10, 108+20, 162+30)."""
    contextual = (5 * int(k) * 2 + 32) // 64  # round half up of 5k/32 in integers
    return int(k) - contextual, contextual


@register
@dataclasses.dataclass
class VisionZip(TowerOutputMethod):
    name = "visionzip"
    noop: ClassVar[dict | None] = {"tokens": None, "prompt_tokens": None, "dominant": None, "contextual": None}
    example: ClassVar[dict | None] = {"tokens": 20}

    #: kept tokens per image / crop, split by the published rule (null: no budget of this kind)
    tokens: int | None = None
    #: kept visual tokens per prompt (count > 1 or share <= 1), per crop as every vision-side method
    prompt_tokens: float | None = None
    #: explicit split (both or neither): dominant tokens (CLS included with cls_token) and contextual tokens
    dominant: int | None = None
    contextual: int | None = None
    #: feed the [CLS] token as the first dominant token (official code)
    cls_token: bool = True

    def check_params(self) -> None:
        self.check_budget_fields()
        for key in ("dominant", "contextual"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise MethodError(f"visionzip: {key} must be an integer >= 0, got {v!r}")
        if (self.dominant is None) != (self.contextual is None):
            raise MethodError("visionzip: give both dominant and contextual, or neither")
        if self.dominant is not None:
            if self.dominant + self.contextual < 1:
                raise MethodError("visionzip: dominant + contextual must keep at least one token")
            if self.tokens is not None or self.prompt_tokens is not None:
                raise MethodError("visionzip: give either dominant/contextual or tokens / prompt_tokens, not both")
        if not isinstance(self.cls_token, bool):
            raise MethodError(f"visionzip: cls_token must be true or false, got {self.cls_token!r}")

    def budget_token_params(self, value: float) -> dict:
        return dict(super().budget_token_params(value), dominant=None, contextual=None)

    def budget_params(self, value) -> dict:
        return dict(super().budget_params(value), dominant=None, contextual=None)

    def fixed_keep(self, geom):
        if self.dominant is not None:
            return self.dominant + self.contextual
        return self.tokens

    def budget_label(self, k: int) -> str:
        if self.dominant is not None:
            return f"dominant + contextual = {self.dominant} + {self.contextual}"
        return super().budget_label(k)

    def split(self, n_keep: int) -> tuple[int, int]:
        if self.dominant is not None and not self.per_prompt:
            return self.dominant, self.contextual
        return split_budget(n_keep)

    def check_keep(self, geom: VisionGeometry, n_keep: int) -> None:
        d, c = self.split(n_keep)
        patches = geom.tokens - 1
        chosen = d - 1 if self.cls_token else d
        if chosen < 0:
            raise MethodError("visionzip: with cls_token the dominant tokens include the [CLS] token: dominant >= 1")
        if chosen + c > patches:
            raise MethodError(
                f"visionzip: {d} dominant + {c} contextual tokens need more than the {patches} patches per image / crop"
            )

    def overhead_macs(self, vit, n_keep: int) -> int:
        d, c = self.split(n_keep)
        remaining = (vit.tokens - 1) - (d - 1 if self.cls_token else d)
        cls_row = vit.tokens * vit.hidden
        return cls_row + (remaining - c) * c * (vit.hidden // vit.heads) if c > 0 else cls_row

    # -- the selection and merge
    def reduce(self, h, q, k, n_keep: int):
        d, c = self.split(n_keep)
        B, N, D = h.shape
        P = N - 1
        score = cls_attention(q, k)[:, :, 1:].sum(dim=1)  # [B, P]
        chosen = d - 1 if self.cls_token else d
        top = score.topk(chosen, dim=-1).indices.sort(dim=-1).values  # dominant patches, original order
        patches = h[:, 1:]
        dominant = patches.gather(1, top[..., None].expand(B, chosen, D))
        if self.cls_token:
            dominant = torch.cat([h[:, :1], dominant], dim=1)
        self.last_selection = {"dominant": top, "targets": None}  # bookkeeping (tests): patch indices
        share = None
        if getattr(self, "track_share", False):  # asked-cell recall: one-hot rows ([CLS] row zero)
            share = torch.zeros(B, chosen, P, device=h.device).scatter(2, top[..., None], 1.0)
            if self.cls_token:
                share = torch.cat([torch.zeros(B, 1, P, device=h.device), share], dim=1)
            self.last_share = share
        if c == 0:
            return dominant
        left = torch.zeros(B, P, dtype=torch.long, device=h.device).scatter(1, top, 1)
        M = P - chosen
        rest = left.sort(dim=-1, stable=True).indices[:, :M]  # remaining patches, original order
        metric = k.mean(dim=1)[:, 1:]  # [B, P, d_h] head-mean keys
        metric = metric.gather(1, rest[..., None].expand(B, M, metric.shape[-1]))
        metric = metric / metric.norm(dim=-1, keepdim=True)
        h_rest = patches.gather(1, rest[..., None].expand(B, M, D))
        step = max(1, M // c)
        target_list = list(range(0, M, step))[:c]
        other_list = sorted(set(range(M)) - set(target_list))
        targets = torch.tensor(target_list, dtype=torch.long, device=h.device)
        others = torch.tensor(other_list, dtype=torch.long, device=h.device)
        sim = torch.matmul(metric[:, others], metric[:, targets].transpose(1, 2))  # [B, M - c, c]
        assign = sim.argmax(dim=-1)  # [B, M - c]
        summed = torch.zeros(B, c, D, dtype=h.dtype, device=h.device).scatter_add(
            1, assign[..., None].expand(B, M - c, D), h_rest[:, others]
        )
        count = torch.zeros(B, c, dtype=h.dtype, device=h.device).scatter_add(
            1, assign, torch.ones(B, M - c, dtype=h.dtype, device=h.device)
        )
        self.last_selection["targets"] = rest[:, targets]
        contextual = h_rest[:, targets] + summed / count.clamp(min=1)[..., None]
        if share is not None:  # a contextual token = target + mean(joined): shares 1/2 and 1/(2 n), or 1 alone
            total = torch.where(count > 0, 2.0, 1.0).float()  # [B, c]
            ctx = torch.zeros(B, c * P, device=h.device)
            t_patch = rest[:, targets]  # [B, c]
            ctx.scatter_add_(1, torch.arange(c, device=h.device)[None] * P + t_patch, 1.0 / total)
            o_patch = rest[:, others]  # [B, M - c]
            w = 1.0 / (count.float().clamp(min=1) * total).gather(1, assign)
            ctx.scatter_add_(1, assign * P + o_patch, w)
            self.last_share = torch.cat([share, ctx.view(B, c, P)], dim=1)
        return torch.cat([dominant, contextual], dim=1)
