"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247; code Cooperx521/PyramidDrop).

Algorithm (paper §3.2, Fig. 2; inference-only use as in its Table 5):

* The decoder is split into stages at the layers `layers` = (l_1, ..., l_S) (LLaVA-1.5 / NeXT: 8, 16,
  24 of 32, so four stages). Stage 0 (layers 0..l_1-1) runs on every visual token.
* At the end of each stage, i.e. at the input of layer l_s, the visual tokens still alive are ranked by
  the attention the **last instruction token** (the last prompt token) gives them, and the lowest ones
  are dropped so that `n_s` remain: n_s = floor(N * lam^s) (the paper's λ = `lam`, the share of visual
  tokens each stage keeps: Table 4's λ = 0.4 / 0.5 / 0.6 and its FLOPs 1.54 / 1.78 / 2.06 T are keep
  shares; the README's `image_token_ratio_list [0.5, 0.25, 0.125]` is lam^s).
* Score (the paper's "lightweight attention"): per head softmax(q_last K^T / sqrt(d_h)) over all alive
  tokens (causal, padding masked), mean over heads, read at the visual columns — computed from layer
  l_s's own input_layernorm, q_proj (one row: the last prompt token) and k_proj (every alive token) with
  RoPE applied, exactly the attention row layer l_s is about to compute (the released code ranks with
  layer l_s's projections too). Only that row is computed; every layer itself runs on SDPA.
* Kept tokens keep their original RoPE / M-RoPE positions (`positions="keep"`, the harness's rule); the
  released code renumbers positions contiguously after each drop and shifts decode positions by the
  tokens dropped, available as `positions="renumber"` (1-D RoPE only). Pruned once at prefill; layers
  from l_s on cache only the tokens alive there; decode steps do not re-prune.

Token budgets (`harness.budget`): a multi-stage method is counted **at its first drop**: `keep` /
`keep_ratio` set n_1 (the visual tokens layers l_1..l_2-1 see), later stages keep floor(n_1 * lam^(s-1)).
Without them n_s = floor(N * lam^s), the released code's rule. The layer average the papers call
"equivalent tokens" is the table's "visual tokens/layer" column (`llm_visual_schedule`).

FLOPs (paper §3.3 and Tables 1/4/5): LLM prefill only, n = the visual tokens (text not counted), per
layer `n (4d^2 + 3dm) + 2 n^2 d` MACs printed as FLOPs, summed over layers; `pdrop_paper_tflops`
reproduces 3.82 / 1.78 T (LLaVA-1.5-7B, vanilla / λ=0.5) and 20.8 / 9.46 T (LLaVA-NeXT-7B, 2880 tokens).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError

_EPS = 1e-9  # floor(n * lam^s) of products that are whole numbers in exact arithmetic (345 * 0.6 = 207)


def stage_counts(n_visual: int, n_stages: int, lam: float, keep: int | None = None,
                 keep_ratio: float | None = None) -> list[int]:
    """Visual tokens kept at each of the `n_stages` drops for a prompt with `n_visual` of them (never
    more than the stage before)."""
    if keep is not None or keep_ratio is not None:
        first = min(int(keep), n_visual) if keep is not None else int(round(n_visual * float(keep_ratio)))
        counts = [first] + [math.floor(first * lam ** s + _EPS) for s in range(1, n_stages)]
    else:
        counts = [math.floor(n_visual * lam ** s + _EPS) for s in range(1, n_stages + 1)]
    out, alive = [], n_visual
    for c in counts:
        alive = min(alive, c)
        out.append(alive)
    return out


def last_token_attention_at(layer, view) -> torch.Tensor:
    """Head-mean softmax attention [B, n] the scoring token (the last prompt token) gives every alive
    token, as decoder layer `layer` would compute it on its input `view.hidden`: its input_layernorm,
    q_proj on that one row, k_proj on every token, the model's RoPE at the tokens' positions."""
    attn = layer.self_attn
    hd = attn.head_dim
    r = view.score_row
    x = layer.input_layernorm(view.hidden)
    cos, sin = view.position_embeddings
    q = LR.post_rope(attn, LR.heads(attn.q_proj(x[:, r : r + 1]), hd), cos[:, r : r + 1], sin[:, r : r + 1])
    k = LR.post_rope(attn, LR.heads(attn.k_proj(x), hd), cos, sin)
    n = k.shape[2]
    allowed = view.valid & (torch.arange(n, device=k.device) <= r)[None]
    return LR.query_row_probs(q, k, allowed, attn.scaling).mean(dim=1)[:, 0]


class _PDropPlan(LR.ReductionPlan):
    def __init__(self, layers, lam, keep, keep_ratio, positions):
        self.layers, self.lam, self.keep, self.keep_ratio, self.positions = list(layers), lam, keep, keep_ratio, positions
        self.first_layer = self.layers[0]
        self.count_first_drop = True
        self._counts: list[int] = []

    def before_layer(self, view):
        if view.layer not in self.layers:
            return None
        s = self.layers.index(view.layer)
        visual = view.visual
        nv = LR.equal_visual_count(visual, "pdrop")
        if s == 0:  # the prompt's visual tokens: every later stage's count follows from them
            self._counts = stage_counts(nv, len(self.layers), self.lam, self.keep, self.keep_ratio)
        n_keep = self._counts[s]
        if n_keep >= nv:
            return None
        scores = last_token_attention_at(self.reducer.layers[view.layer], view)
        return LR.keep_top_visual(scores, visual, n_keep)


@register
@dataclasses.dataclass
class PyramidDrop(Method):
    name = "pdrop"
    budget_at_first_drop = True  # budget.kind=tokens counts the visual tokens after the first drop
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "keep"
    #: a budget sets keep or keep_ratio (the first drop); lam still sets the later stages
    budget_param = "keep"
    noop = {"lam": 1.0}
    example = {"layers": [1, 2, 3], "lam": 0.5}

    #: decoder layers at whose input a stage ends and visual tokens are dropped (0-based, increasing)
    layers: list[int] | tuple[int, ...] = dataclasses.field(default_factory=lambda: [8, 16, 24])
    #: the paper's λ: share of the alive visual tokens each drop keeps, in (0, 1]; 1 = no-op
    lam: float = 0.5
    #: visual tokens kept at the first drop (token budgets); later drops keep floor(keep * lam^(s-1))
    keep: int | None = None
    #: share of the prompt's visual tokens kept at the first drop, round(N * keep_ratio) (token budgets)
    keep_ratio: float | None = None
    #: "keep" original RoPE positions (vtbench's rule) or "renumber" them (the released code)
    positions: str = "keep"

    def check_params(self) -> None:
        L = self.layers
        if not isinstance(L, (list, tuple)) or not L or any(isinstance(x, bool) or not isinstance(x, int) for x in L):
            raise MethodError(f"pdrop: layers must be a non-empty list of integers, got {L!r}")
        if L[0] < 1 or any(b <= a for a, b in zip(L, L[1:])):
            raise MethodError(f"pdrop: layers must be increasing and >= 1 (stage 0 runs on every token), got {list(L)!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 < float(self.lam) <= 1.0:
            raise MethodError(f"pdrop: lam must be a number in (0, 1] (the share each drop keeps), got {self.lam!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise MethodError(f"pdrop: keep must be an integer >= 1 (visual tokens kept at the first drop), got {self.keep!r}")
        kr = self.keep_ratio
        if kr is not None and (isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0):
            raise MethodError(f"pdrop: keep_ratio must be a number in (0, 1], got {kr!r}")
        if kr is not None and self.keep is not None:
            raise MethodError("pdrop: give either keep or keep_ratio, not both")
        if self.positions not in ("keep", "renumber"):
            raise MethodError(f"pdrop: positions must be 'keep' or 'renumber', got {self.positions!r}")

    def _noop(self) -> bool:
        if self.keep is not None or (self.keep_ratio is not None and float(self.keep_ratio) < 1.0):
            return False
        return float(self.lam) == 1.0

    def counts(self, n_visual: int) -> list[int]:
        """Visual tokens alive after each drop for a prompt with `n_visual` of them."""
        return stage_counts(n_visual, len(self.layers), float(self.lam), self.keep, self.keep_ratio)

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"keep": int(value), "keep_ratio": None}
        return {"keep": None, "keep_ratio": float(value)}

    def visual_tokens_kept(self, layout) -> int:
        """The token budget's count: visual tokens after the **first** drop."""
        if self._noop():
            return layout.visual
        return self.counts(layout.visual)[0]

    def validate(self, adapter) -> None:
        super().validate(adapter)
        if self._noop():
            return
        self.require_full_attention(adapter)
        LR.check_positions(self.positions, adapter, "pdrop")
        L = adapter.num_llm_layers
        if self.layers[-1] >= L:
            raise MethodError(f"pdrop: layers={list(self.layers)} must all be < the number of LLM layers ({L})")
        if self.keep is not None and adapter.family == "llava" and self.keep > adapter.visual_tokens_per_image:
            raise MethodError(
                f"pdrop: keep={self.keep} exceeds the {adapter.visual_tokens_per_image} visual tokens per image"
            )

    def apply(self, model, adapter):
        self.validate(adapter)
        if self._noop():
            return model
        LR.install(model, adapter, _PDropPlan(self.layers, float(self.lam), self.keep, self.keep_ratio, self.positions))
        return model

    # ---- FLOPs --------------------------------------------------------------------------------------
    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """Visual tokens at each layer's input (all of them before l_1, n_s from l_s on) and the scores'
        MACs: at every drop, one q_proj row, k_proj over the alive tokens and the q.K^T row."""
        if self._noop():
            return None
        s, N = shapes.llm, layout.visual
        per_layer, alive, score = [], N, 0
        stages = dict(zip(self.layers, self.counts(N)))
        for i in range(s.layers):
            if i in stages and stages[i] < alive:
                n = layout.total - (N - alive)
                score += s.hidden * s.heads * s.head_dim + n * s.hidden * s.kv_heads * s.head_dim + s.heads * n * s.head_dim
                alive = stages[i]
            per_layer.append(alive)
        if alive >= N:
            return None
        return per_layer, score

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
        per_layer, score = schedule
        macs["llm"] = sum(A.llm_layer_macs(shapes.llm, layout.with_visual(v).total) for v in per_layer) + score
        return macs


# ---- the paper's FLOPs numbers ------------------------------------------------------------------------
#: the paper's models (Tables 1, 4, 5) as vtbench model configs, and their visual tokens per image
PAPER_MODELS = {"llava15_7b": 576, "llava_next_7b": 2880}


def pdrop_paper_tflops(model: str, lam: float | None = 0.5, layers=(8, 16, 24)) -> float:
    """"Infer Flops(T)" of the paper's Tables 1, 4 and 5: the LLM prefill over the visual tokens only
    (LLaVA-1.5: 576; LLaVA-NeXT: 5 x 576 = 2880, newline tokens not counted), MACs summed over layers
    (printed as FLOPs), with `PyramidDrop(layers, lam)`'s per-layer schedule; lam=None: the dense model.
    The selection's own MACs are not counted (the paper calls them negligible)."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR
    from harness.models.loading import config_from_cfg

    config = config_from_cfg(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    shapes = A.ModelShapes.from_config(config)
    layout = A.TokenLayout(before=0, visual=PAPER_MODELS[model], after=0)
    sched = None if lam is None else PyramidDrop(layers=list(layers), lam=lam).llm_visual_schedule(shapes, layout)
    per_layer = [layout.visual] * shapes.llm.layers if sched is None else sched[0]
    return sum(A.llm_layer_macs(shapes.llm, v) for v in per_layer) / 1e12
