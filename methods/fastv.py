"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv 2403.06764).

Algorithm (paper §4, KV-cache variant of the released code; spec token_methods.md Part 1):

* Decoder layers 0..K-1 run on the full prompt.
* At layer K-1 the attention row of the **last prompt token** is computed from that layer's own
  post-RoPE query and keys: per head `softmax(q_last K^T / sqrt(d_h))` (padding keys masked), then the
  mean over heads. Only this one row is computed here (H x n x d_h MACs); the layer's attention output
  itself still comes from SDPA (or whatever implementation the model uses).
* Visual token j's score is that mean attention; the top `round(N_img * (1 - R))` visual tokens (or
  `keep`) are kept, every non-visual token is kept, in original order and with their original RoPE
  positions (gaps allowed).
* Layers K..L-1 run on the kept tokens only and cache only them; decode steps do not re-prune and
  continue at full-length positions. Uncached calls re-prune from their own last token (the original
  no-cache FastV); `methods._shared.llm_reduce.pin_prompt_length` pins the scoring token instead.

FLOPs (paper §4.2, eq. 5): per layer `4nd^2 + 2n^2d + 2ndm`; reduction ratio
`1 - [K F(n) + (T-K) F(n_hat)] / [T F(n)]`. `fastv_paper_flops` reproduces the paper's Table 1
"FLOPs(B)" column: that formula averaged over the T layers, in billions, with n = system + image tokens
and n_hat = n - 576 R (no rounding of the kept count).
"""
from __future__ import annotations

import dataclasses

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


def kept_visual(n_visual: int, R: float, keep: int | None, keep_ratio: float | None = None) -> int:
    """Visual tokens FastV keeps out of `n_visual` (`keep`, else `round(n * keep_ratio)`, else
    `round(n * (1 - R))`)."""
    if keep is not None:
        return min(int(keep), n_visual)
    if keep_ratio is not None:
        return int(round(n_visual * float(keep_ratio)))
    return int(round(n_visual * (1.0 - R)))


class _FastVPlan(LR.ReductionPlan):
    def __init__(self, K: int, R: float, keep: int | None, positions: str, keep_ratio: float | None = None):
        self.first_layer = K
        self.K, self.R, self.keep, self.positions, self.keep_ratio = K, R, keep, positions, keep_ratio

    def score_layers(self):
        return [self.K - 1]

    def before_layer(self, view):
        if view.layer != self.K:
            return None
        red = self.reducer
        q, k = red.captures[self.K - 1].take()
        visual = view.visual
        nv = LR.equal_visual_count(visual, "fastv")
        n_keep = kept_visual(nv, self.R, self.keep, self.keep_ratio)
        if n_keep >= nv:
            return None
        scores = last_token_attention(red.layers[self.K - 1].self_attn, q, k, view)
        return LR.keep_top_visual(scores, visual, n_keep)


def last_token_attention(attn, q: torch.Tensor, k: torch.Tensor, view) -> torch.Tensor:
    """Head-mean softmax attention [B, n] that the scoring token (the last prompt token) gives every
    token, from a layer's captured q_proj/k_proj outputs (over all n tokens) and its cos/sin."""
    hd = attn.head_dim
    r = view.score_row
    cos, sin = view.position_embeddings
    q_r = LR.post_rope(attn, LR.heads(q[:, r : r + 1], hd), cos[:, r : r + 1], sin[:, r : r + 1])
    k = LR.post_rope(attn, LR.heads(k, hd), cos, sin)
    n = k.shape[2]
    allowed = view.valid & (torch.arange(n, device=k.device) <= r)[None]
    probs = LR.query_row_probs(q_r, k, allowed, attn.scaling)  # [B, H, 1, n]
    return probs.mean(dim=1)[:, 0]


@register
@dataclasses.dataclass
class FastV(Method):
    name = "fastv"
    noop = {"R": 0.0}
    example = {"K": 1, "R": 0.5}
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "keep"
    budget_param = "keep"
    #: a budget sets keep or keep_ratio, which take precedence over R (`kept_visual`)
    budget_ignores = ("R",)

    #: first pruned decoder layer (0-based); scores come from layer K-1's attention
    K: int = 2
    #: fraction of visual tokens dropped, in [0, 1)
    R: float = 0.5
    #: number of visual tokens kept (overrides R when set)
    keep: int | None = None
    #: fraction of the prompt's visual tokens kept, round(n * keep_ratio) (overrides R; token budgets)
    keep_ratio: float | None = None
    #: "keep" original RoPE positions (FastV) or "renumber" them contiguously after the drop
    positions: str = "keep"

    def check_params(self) -> None:
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise MethodError(f"fastv: K must be an integer >= 1 (scores need layer K-1), got {self.K!r}")
        if not (0.0 <= float(self.R) < 1.0):
            raise MethodError(f"fastv: R must be in [0, 1), got {self.R!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise MethodError(f"fastv: keep must be an integer >= 1 (visual tokens kept), got {self.keep!r}")
        if self.positions not in ("keep", "renumber"):
            raise MethodError(f"fastv: positions must be 'keep' or 'renumber', got {self.positions!r}")
        kr = self.keep_ratio
        if kr is not None and (isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0):
            raise MethodError(f"fastv: keep_ratio must be a number in (0, 1], got {kr!r}")
        if kr is not None and self.keep is not None:
            raise MethodError("fastv: give either keep or keep_ratio, not both")

    def _noop(self) -> bool:
        if self.keep is not None:
            return False
        return float(self.keep_ratio) >= 1.0 if self.keep_ratio is not None else self.R == 0.0

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"keep": int(value), "keep_ratio": None}
        return {"keep": None, "keep_ratio": float(value)}

    def visual_tokens_kept(self, layout) -> int:
        if self._noop():
            return layout.visual
        return min(layout.visual, kept_visual(layout.visual, float(self.R), self.keep, self.keep_ratio))

    def validate(self, adapter) -> None:
        super().validate(adapter)
        L = adapter.num_llm_layers
        if self._noop():
            return  # the documented no-op (nothing dropped) is valid on any depth
        self.require_full_attention(adapter)
        LR.check_positions(self.positions, adapter, "fastv")
        if self.K >= L:
            raise MethodError(f"fastv: K={self.K} must be < the number of LLM layers ({L})")
        if self.keep is not None and adapter.family == "llava" and self.keep > adapter.visual_tokens_per_image:
            raise MethodError(
                f"fastv: keep={self.keep} exceeds the {adapter.visual_tokens_per_image} visual tokens per image"
            )

    def apply(self, model, adapter):
        self.validate(adapter)
        if self._noop():
            return model  # no-op: nothing is dropped
        LR.install(model, adapter, _FastVPlan(self.K, float(self.R), self.keep, self.positions, self.keep_ratio))
        return model

    # ---- FLOPs --------------------------------------------------------------------------------------
    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """Visual tokens at each layer's input (all of them in layers < K, the kept ones from K on) and
        the score row's MACs (one query row x n keys x heads, QK^T only); None when nothing is dropped."""
        s, n = shapes.llm, layout.total
        kept = self.visual_tokens_kept(layout)
        if kept >= layout.visual:
            return None
        return [layout.visual] * self.K + [kept] * (s.layers - self.K), s.heads * n * s.head_dim

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
        per_layer, score = schedule
        macs["llm"] = sum(A.llm_layer_macs(shapes.llm, layout.with_visual(v).total) for v in per_layer) + score
        return macs


# ---- the paper's FLOPs table ----------------------------------------------------------------------------
#: FastV Table 1's LLaVA-1.5 language models, as vtbench model configs
PAPER_MODELS = {"7B": "llava15_7b", "13B": "llava15_13b"}


def fastv_paper_flops(model: str, K: int | None = None, R: float = 0.0, n: float | None = None,
                      image_tokens: int = 576) -> float:
    """FastV Table 1 "FLOPs(B)": eq. 5's numerator averaged per layer, in units of 1e9, under FastV's
    convention (`harness.efficiency.conventions.fastv_flops`, the one place the formula lives);
    n_hat = n - image_tokens * R unrounded; K=None: the unpruned baseline."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR
    from harness.efficiency import conventions as C
    from harness.models.loading import config_from_cfg

    config = config_from_cfg(OmegaConf.load(CONF_DIR / "model" / f"{PAPER_MODELS[model]}.yaml"))
    n = C.fastv_n(config, image_tokens) if n is None else n
    L = config.text_config.num_hidden_layers
    tokens = [n] * L if K is None else [n] * K + [n - image_tokens * R] * (L - K)
    return C.fastv_flops(config, tokens) / 1e9
