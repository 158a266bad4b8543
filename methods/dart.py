"""DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025 (arXiv 2502.11494; code ZichenWen1/DART, read through the fork
xqy1111111/DART because the original could not be fetched here).

Algorithm (paper §3, "Duplication-Aware Reduction of Tokens"; defaults of the released LLaVA scripts):

* Layers 0..K-1 run on every token (K = 2).
* **Pivots** (paper: "pivot tokens" chosen by K-norm): the `pivot_image` visual tokens and the
  `pivot_text` instruction tokens (prompt tokens after the last visual token) whose keys at layer K-1
  have the largest L1 norm (all heads concatenated, after RoPE at the positions counted from the prompt's
  first token, as in the released code's batch-1 runs; 4 + 4 in the released scripts).
* **Duplication**: cosine similarity between each pivot and every visual token, on the hidden states
  entering layer K passed through the LLM's final norm (the released code's features).
* For each pivot in turn, the not yet chosen visual tokens **least** similar to it are kept; visual
  pivots are kept too. The kept visual tokens are `keep` (or round(N * keep_ratio)) in all: the visual
  pivots plus (keep - pivots) chosen tokens, split over the pivots as evenly as possible (the first
  pivots take one more when it does not divide). Layers K..L-1 run on the kept visual tokens and every
  text token, cache only them, and keep the original RoPE / M-RoPE positions.
* No attention weights are read: the keys come from layer K-1's k_proj (a forward hook), so every
  layer stays on SDPA (or FlashAttention), which is DART's point.

Where this differs from the released code (the paper states the count, the code does not meet it):
the code keeps the visual pivots **plus** ceil(budget // pivots) tokens per pivot (e.g. 4 + 8 x 16 = 132
for "128"); here the kept count is exactly the budget (vtbench's token budget rule). The code walks its
pivots in Python set order; here visual pivots come first, then text pivots, each by decreasing norm.
A prompt with fewer instruction tokens than `pivot_text` uses all of them.

FLOPs: dense layers before K, reduced from K on, plus the duplication matrix (pivots x visual tokens x
hidden size MACs); norms and top-k are element-wise (not counted).
"""
from __future__ import annotations

import dataclasses

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


def kept_visual(n_visual: int, keep: int | None, keep_ratio: float) -> int:
    if keep is not None:
        return min(int(keep), n_visual)
    return int(round(n_visual * float(keep_ratio)))


def quotas(n_choose: int, n_pivots: int) -> list[int]:
    """Tokens each pivot keeps: n_choose split as evenly as possible, the first pivots taking the rest."""
    base, extra = divmod(n_choose, n_pivots)
    return [base + (1 if j < extra else 0) for j in range(n_pivots)]


def dart_select(feats: torch.Tensor, key_norm: torch.Tensor, visual: torch.Tensor, text_cand: torch.Tensor,
                n_keep: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """Visual ordinals (sorted) DART keeps for one sample: feats [n, d], key_norm [n], visual [n] bool,
    text_cand [n] bool (the instruction tokens that may be text pivots)."""
    vis = visual.nonzero().squeeze(1)
    nv = int(vis.shape[0])
    p_img = min(pivot_image, n_keep)
    img_piv = torch.topk(key_norm[vis], p_img).indices  # visual ordinals, by decreasing norm
    choose = n_keep - p_img
    if choose <= 0:
        return torch.sort(img_piv).values
    txt = text_cand.nonzero().squeeze(1)
    txt_piv = txt[torch.topk(key_norm[txt], min(pivot_text, int(txt.shape[0]))).indices]
    pivots = torch.cat([vis[img_piv], txt_piv])
    n_piv = p_img + int(txt_piv.shape[0])
    unit = torch.nn.functional.normalize(feats.float(), dim=-1)
    sim = unit[pivots] @ unit[vis].T  # [P, nv]: the duplication matrix
    free = torch.ones(nv, dtype=torch.bool, device=feats.device)
    free[img_piv] = False
    chosen = [img_piv]
    for j, q in enumerate(quotas(choose, n_piv)):
        if q == 0:
            continue
        pick = torch.topk(sim[j].masked_fill(~free, float("inf")), q, largest=False).indices
        free[pick] = False
        chosen.append(pick)
    return torch.sort(torch.cat(chosen)).values


def rope_at(rotary, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, n, d_h] of a 1-D rotary embedding module at positions pos [B, n] (the module's own
    inv_freq and attention scaling; an outer product by broadcasting, so no matrix product is counted)."""
    freqs = pos[..., None].float() * rotary.inv_freq.float()[None, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class _DARTPlan(LR.ReductionPlan):
    def __init__(self, K, keep, keep_ratio, pivot_image, pivot_text, norm):
        self.first_layer = K
        self.K, self.keep, self.keep_ratio = K, keep, keep_ratio
        self.pivot_image, self.pivot_text, self.norm = pivot_image, pivot_text, norm

    def score_layers(self):
        return [self.K - 1]

    def _key_rope(self, view, dtype):
        """RoPE for the pivot keys at positions counted from each prompt's first real token, as the released
        code's batch-1 runs see them: a key's L1 norm after RoPE depends on its absolute position, so a
        left-padded prompt given positions that count the padding would otherwise pick other pivots. M-RoPE
        families derive their positions from the mask already (their own cos/sin are used)."""
        red = self.reducer
        if getattr(red.adapter, "position_streams", 1) > 1 or red.rotary is None:
            return view.position_embeddings
        pos = view.state.pos.gather(1, view.index)
        first = torch.where(view.valid, pos, torch.iinfo(pos.dtype).max).min(dim=1).values
        return rope_at(red.rotary, pos - first[:, None], dtype)

    def before_layer(self, view):
        if view.layer != self.K:
            return None
        red = self.reducer
        _, k = red.captures[self.K - 1].take()
        visual = view.visual
        nv = LR.equal_visual_count(visual, "dart")
        n_keep = kept_visual(nv, self.keep, self.keep_ratio)
        if n_keep >= nv:
            return None
        attn = red.layers[self.K - 1].self_attn
        cos, sin = self._key_rope(view, k.dtype)
        k = LR.post_rope(attn, LR.heads(k, attn.head_dim), cos, sin)  # [B, H_kv, n, d_h]
        key_norm = k.float().abs().sum(dim=(1, 3))  # [B, n]: L1 norm over heads and channels
        feats = self.norm(view.hidden)
        n = visual.shape[1]
        col = torch.arange(n, device=visual.device)
        last_vis = torch.where(visual, col, -1).max(1).values  # [B]
        text_cand = (~visual) & view.valid & (col[None] > last_vis[:, None]) & (col[None] <= view.score_row)
        scores = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for b in range(visual.shape[0]):
            kept = dart_select(feats[b], key_norm[b], visual[b], text_cand[b], n_keep, self.pivot_image, self.pivot_text)
            row = torch.zeros(nv, device=visual.device)
            row[kept] = 1.0
            scores[b, visual[b]] = row
        return LR.keep_top_visual(scores, visual, n_keep)


@register
@dataclasses.dataclass
class DART(Method):
    name = "dart"
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "keep"
    budget_param = "keep"
    noop = {"keep_ratio": 1.0}
    example = {"K": 1, "keep_ratio": 0.25, "pivot_image": 2, "pivot_text": 2}

    #: the pruned layer (0-based, >= 1): keys for the pivots come from layer K-1
    K: int = 2
    #: visual tokens kept (pivots included; overrides keep_ratio when set)
    keep: int | None = None
    #: share of the prompt's visual tokens kept, round(N * keep_ratio), in (0, 1]; 1 = no-op
    keep_ratio: float = 0.222
    #: visual pivots (largest key L1 norm among the visual tokens), >= 1
    pivot_image: int = 4
    #: text pivots (largest key L1 norm among the instruction tokens after the image), >= 0
    pivot_text: int = 4

    def check_params(self) -> None:
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise MethodError(f"dart: K must be an integer >= 1 (pivot keys come from layer K-1), got {self.K!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise MethodError(f"dart: keep must be an integer >= 1 (visual tokens kept), got {self.keep!r}")
        kr = self.keep_ratio
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0:
            raise MethodError(f"dart: keep_ratio must be a number in (0, 1], got {kr!r}")
        for pname, low in (("pivot_image", 1), ("pivot_text", 0)):
            v = getattr(self, pname)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise MethodError(f"dart: {pname} must be an integer >= {low}, got {v!r}")

    def _noop(self) -> bool:
        return self.keep is None and float(self.keep_ratio) >= 1.0

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"keep": int(value)}
        return {"keep": None, "keep_ratio": float(value)}

    def visual_tokens_kept(self, layout) -> int:
        return min(layout.visual, kept_visual(layout.visual, self.keep, float(self.keep_ratio)))

    def validate(self, adapter) -> None:
        super().validate(adapter)
        if self._noop():
            return
        self.require_full_attention(adapter)
        if self.K >= adapter.num_llm_layers:
            raise MethodError(f"dart: K={self.K} must be < the number of LLM layers ({adapter.num_llm_layers})")
        if self.keep is not None and adapter.family == "llava" and self.keep > adapter.visual_tokens_per_image:
            raise MethodError(f"dart: keep={self.keep} exceeds the {adapter.visual_tokens_per_image} visual tokens per image")

    def apply(self, model, adapter):
        self.validate(adapter)
        if self._noop():
            return model
        norm = adapter.language_model.norm
        LR.install(model, adapter, _DARTPlan(self.K, self.keep, float(self.keep_ratio), self.pivot_image,
                                             self.pivot_text, norm))
        return model

    # ---- FLOPs --------------------------------------------------------------------------------------
    def selection_macs(self, shapes, layout) -> int:
        """The duplication matrix: (visual pivots + text pivots) x visual tokens x hidden size."""
        nv = layout.visual
        n_keep = self.visual_tokens_kept(layout)
        p_img = min(self.pivot_image, n_keep)
        if n_keep >= nv or n_keep - p_img <= 0:
            return 0
        return (p_img + min(self.pivot_text, layout.after)) * nv * shapes.llm.hidden

    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """All visual tokens in layers < K, the kept ones from K on, and the duplication matrix's MACs."""
        kept = self.visual_tokens_kept(layout)
        if kept >= layout.visual:
            return None
        return [layout.visual] * self.K + [kept] * (shapes.llm.layers - self.K), self.selection_macs(shapes, layout)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
        per_layer, score = schedule
        macs["llm"] = sum(A.llm_layer_macs(shapes.llm, layout.with_visual(v).total) for v in per_layer) + score
        return macs
