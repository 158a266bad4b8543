"""FiCoCo-V (Han et al., "Filter, Correlate, Compress: Training-Free Token Reduction for MLLM
Acceleration", arXiv 2411.17686 v4, AAAI 2026; v1 "Rethinking Token Reduction in MLLMs"): filter,
correlate and compress visual tokens inside the CLIP vision encoder, between the attention residual and
LN2/MLP of every layer from `start_layer` (paper: 12) to the last layer that feeds the LLM.

Per reducing layer with N patch tokens (+ CLS at index 0) and N_S = r tokens to remove:

* A^v: the layer's attention, mean over heads, computed from the layer's own q/k with one extra
  matmul (SDPA still produces the attention output). Paper: softmax probabilities (`scores="probs"`);
  reference code: pre-softmax head-mean logits QKᵀ/(H·√d_h) (`scores="logits"`).
* Filter (eq. 1): s_i = λ·(1/N)Σ_{j∈patches} A^v_{i,j} − (1−λ)·a_CLS,i (vision-aware minus semantic-aware
  term; higher = more redundant), a_CLS,i = A^v_{0,i}. Local penalty: on the original 2-D patch grid split
  into non-overlapping `window`x`window` windows (discarded positions empty), the highest score in each
  window is multiplied by `penalty_scale` (2). The N_S highest scores form the source set S, the others
  the target set T. (Reference code: both terms L2-normalised across tokens, `normalize=True`, and weight
  0.65 on the vision-aware term, `lam=0.65`.)
* Correlate: C_{i,j} = A^v_{i,j}, i ∈ S, j ∈ T; τ_i = quantile_ε(C_{i,:}) (ε = 0.998), J_i = {j: C_{i,j} ≥ τ_i}.
* Compress (eq. 2, self-preserving): α_ij = C_ij / Σ_{j'∈J_i} C_ij' (with `scores="logits"`: softmax of C_i
  restricted to J_i, as logits can be negative); X_j <- (X_j + Σ_{i∈I_j} α_ij X_i) / (1 + Σ_{i∈I_j} α_ij);
  S is removed. (`correlate="ref"`: the reference code's one k per layer = the largest count of entries
  strictly above the ε-quantile of a full row, weights = top-k of softmax(row), renormalised; targets are
  restricted to kept patches, so the code's index mix-up in compress is not reproduced.) Kept tokens stay
  in their original order with CLS first (not reproduced from the reference code: its score-sorted order
  with CLS last, and its never-reset local-penalty buffer, spec §3.3 items 4-5).

Budget: `tokens` = final visual tokens per image/crop (192 / 128 / 64 of 576): 576 − tokens removals are
spread over layers start_layer..last_useful (11 layers, 12..22, for LLaVA-1.5), ⌊R/L⌋ each and the last
R mod L layers one more; or `r` per layer (reference-code style: 576 − 11·r, r=42 -> 114). The mapping of
the paper's TFLOPs labels to budgets is not published (spec §3.3); `ficoco_paper_tflops` reproduces the
labels from the visual-token count (3.3 / 2.4(2.5) / 1.6 T for 192 / 128 / 64 tokens).

LLaVA-NeXT: every anyres crop is reduced independently to the same count (the local-penalty grid is the
crop's own 24x24 grid); the image is packed as [crop tokens..., image_newline] (see vision_reduce).

FLOPs (analytic, MACs, per crop): patch embedding + Σ_l `vit_layer_macs(n_l, n_l − r_l)` + per reducing
layer the score matmul n_l²·d (per-head QKᵀ, = head-mean trick) and the compress matmul (P_l − r_l)·r_l·d
(P_l = n_l − 1 patches); projector and LLM over the reduced count.
"""
from __future__ import annotations

import dataclasses

import torch

from methods import register
from methods._shared.vision_reduce import (
    VisionGeometry,
    VisionReducer,
    VisionReductionMethod,
    check_prompt_tokens,
    gather_tokens,
    split_evenly,
    tokens_through_layers,
)
from methods.base import MethodError


class FiCoCoVReducer(VisionReducer):
    prop_attn = False

    def __init__(self, schedule, m: "FiCoCoV", grid: int):
        super().__init__(schedule)
        self.m = m
        self.grid = grid

    def attention(self, q, k):
        """Head-mean attention A^v [B, N, N] from the layer's q/k [B, H, N, dh]."""
        B, H, N, dh = q.shape
        scale = dh**-0.5
        if self.m.scores == "probs":
            return ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1).mean(dim=1)
        qf = q.transpose(1, 2).reshape(B, N, H * dh)
        kf = k.transpose(1, 2).reshape(B, N, H * dh)
        return (qf @ kf.transpose(-1, -2)) * (scale / H)

    def local_penalty(self, s, pos):
        """Multiply the highest score of each window of the original patch grid by penalty_scale."""
        w, g = self.m.window, self.grid
        p = pos - 1  # patch index on the original grid
        row, col = p // g, p % g
        per_row = -(-g // w)
        win = (row // w) * per_row + col // w  # [B, P]
        B, P = s.shape
        nwin = per_row * per_row
        wmax = torch.full((B, nwin), -torch.inf, dtype=s.dtype, device=s.device)
        wmax = wmax.scatter_reduce(1, win, s, reduce="amax")
        is_max = s == wmax.gather(1, win)
        idx = torch.arange(P, device=s.device).expand(B, P)
        first = torch.full((B, nwin), P, dtype=torch.long, device=s.device)
        first = first.scatter_reduce(1, win, torch.where(is_max, idx, P), reduce="amin")
        chosen = idx == first.gather(1, win)
        return torch.where(chosen, s * self.m.penalty_scale, s)

    def ref_weights(self, A, src, keep_cols, B, r, P):
        """Reference-code correlate: each discarded row over all N tokens; threshold = ε-quantile, strict
        count; one k per image = the largest count; weights = top-k of softmax(row) (probabilities as they
        are with scores="probs"), here restricted to kept patches (the code's index mix-up is not kept)."""
        N = P + 1
        rows = A.gather(1, (src + 1)[..., None].expand(B, r, N))  # [B, r, N]
        tau = torch.quantile(rows.float(), self.m.eps, dim=-1, keepdim=True).to(rows.dtype)
        k = (rows > tau).sum(dim=-1).amax(dim=-1).clamp(min=1, max=P - r)  # [B]
        probs = rows if self.m.scores == "probs" else rows.softmax(dim=-1)
        cand = probs[:, :, 1:].gather(2, keep_cols)  # [B, r, P - r]
        rank = cand.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return torch.where(rank < k[:, None, None], cand, torch.zeros_like(cand))

    def reduce(self, layer, x, q, k, state, r):
        m = self.m
        B, N, D = x.shape
        P = N - 1
        A = self.attention(q, k)
        Ap = A[:, 1:, 1:]
        vr = Ap.mean(dim=-1)  # vision-aware redundancy of each patch
        cls = A[:, 0, 1:]  # CLS attention to each patch
        if m.normalize:
            vr = vr / vr.norm(dim=-1, keepdim=True)
            cls = cls / cls.norm(dim=-1, keepdim=True)
        s = m.lam * vr - (1 - m.lam) * cls
        pos_p = state.pos[:, 1:]
        if m.local_penalty:
            s = self.local_penalty(s, pos_p)
        order = s.argsort(dim=-1, descending=True, stable=True)
        src, keep = order[:, :r], order[:, r:].sort(dim=-1).values
        keep_cols = keep[:, None, :].expand(B, r, P - r)
        if m.correlate == "paper":
            C = Ap.gather(1, src[..., None].expand(B, r, P)).gather(2, keep_cols)
            tau = torch.quantile(C.float(), m.eps, dim=-1, keepdim=True).to(C.dtype)
            sel = C >= tau
            if m.scores == "probs":
                w = torch.where(sel, C, torch.zeros_like(C))
            else:
                w = torch.where(sel, (C - C.amax(dim=-1, keepdim=True)).exp(), torch.zeros_like(C))
        else:
            w = self.ref_weights(A, src, keep_cols, B, r, P)
        alpha = w / w.sum(dim=-1, keepdim=True)  # [B, r, P - r]
        xp = x[:, 1:]
        x_keep, x_src = gather_tokens(xp, keep), gather_tokens(xp, src)
        num = x_keep + alpha.transpose(1, 2) @ x_src
        den = 1 + alpha.sum(dim=1)
        # bookkeeping only (not used by the computation): the original tokens each token now carries
        size = state.size if state.size is not None else torch.ones(B, N, dtype=x.dtype, device=x.device)
        size_p = size[:, 1:]
        carried = (alpha * size_p.gather(1, src)[..., None]).sum(dim=1)
        state.size = torch.cat([size[:, :1], size_p.gather(1, keep) + carried], dim=1)
        state.pos = torch.cat([state.pos[:, :1], pos_p.gather(1, keep)], dim=1)
        if state.track:  # content bookkeeping (asked-cell recall): the shares mix with the merge weights
            share = state.source if state.source is not None else torch.eye(N, device=x.device).expand(B, N, N)
            sp = share[:, 1:]
            mixed = (gather_tokens(sp, keep) + alpha.transpose(1, 2).float() @ gather_tokens(sp, src)) / den[..., None].float()
            state.source = torch.cat([share[:, :1], mixed], dim=1)
        return torch.cat([x[:, :1], num / den[..., None]], dim=1)


@register
@dataclasses.dataclass
class FiCoCoV(VisionReductionMethod):
    name = "ficoco_v"
    noop = {"r": 0}
    example = {"tokens": 16, "start_layer": 0}
    budget_tokens_param = "prompt_tokens"
    budget_param = "tokens"

    #: final visual tokens per image/crop reaching the LLM (e.g. 192 / 128 / 64 of 576); overrides r
    tokens: int | None = None
    #: visual tokens reaching the LLM for the whole prompt (all images, crops and NeXT newlines): a count
    #: (> 1) or a share (<= 1) of the prompt's visual tokens; overrides tokens / r. Each crop gets the
    #: same k, the nearest to the target (token budgets, see harness/budget.py)
    prompt_tokens: float | None = None
    #: tokens removed per reducing layer (reference-code style); 0 = nothing removed
    r: int = 0
    #: first CLIP layer that reduces (paper: 12 of 24); reduces up to the last layer feeding the LLM
    start_layer: int = 12
    #: λ, weight of the vision-aware term in eq. 1 (paper 0.35; reference code effectively 0.65)
    lam: float = 0.35
    #: ε, quantile of the token-adaptive correlation threshold
    eps: float = 0.998
    #: local penalty on the 2-D grid (paper: on)
    local_penalty: bool = True
    #: scaling coefficient of the local penalty (paper 2)
    penalty_scale: float = 2.0
    #: local-penalty window side (paper 2 -> 2x2)
    window: int = 2
    #: "probs" (paper: softmax attention) or "logits" (reference code: head-mean pre-softmax logits)
    scores: str = "probs"
    #: L2-normalise both filter terms across tokens (reference code)
    normalize: bool = False
    #: "paper": per-token ε-quantile over kept tokens, α ∝ C; "ref": reference code's single top-k per
    #: layer (k = max strict count above the ε-quantile of full rows), weights from softmax(row)
    correlate: str = "paper"

    def check_params(self) -> None:
        check_prompt_tokens(self)
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise MethodError(f"ficoco_v: tokens must be a positive integer, got {self.tokens!r}")
        if not isinstance(self.r, int) or self.r < 0:
            raise MethodError(f"ficoco_v: r must be a non-negative integer, got {self.r!r}")
        if self.tokens is not None and self.r:
            raise MethodError("ficoco_v: give either tokens or r, not both")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise MethodError(f"ficoco_v: start_layer must be a non-negative integer, got {self.start_layer!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise MethodError(f"ficoco_v: lam must be in [0, 1], got {self.lam}")
        if not 0.0 < self.eps < 1.0:
            raise MethodError(f"ficoco_v: eps must be in (0, 1), got {self.eps}")
        if self.penalty_scale <= 0:
            raise MethodError(f"ficoco_v: penalty_scale must be positive, got {self.penalty_scale}")
        if not isinstance(self.window, int) or self.window < 1:
            raise MethodError(f"ficoco_v: window must be a positive integer, got {self.window!r}")
        if self.correlate not in ("paper", "ref"):
            raise MethodError(f"ficoco_v: correlate must be 'paper' or 'ref', got {self.correlate!r}")
        if self.scores not in ("probs", "logits"):
            raise MethodError(f"ficoco_v: scores must be 'probs' or 'logits', got {self.scores!r}")

    def schedule(self, geom: VisionGeometry) -> dict[int, int]:
        if self.tokens is None and not self.r:
            return {}
        if self.start_layer > geom.last_useful:
            raise MethodError(
                f"ficoco_v: start_layer={self.start_layer} is after the last CLIP layer feeding the LLM "
                f"({geom.last_useful})"
            )
        layers = list(range(self.start_layer, geom.last_useful + 1))
        if self.tokens is not None:
            if self.tokens > geom.visual_per_crop:
                raise MethodError(
                    f"ficoco_v: tokens={self.tokens} exceeds the {geom.visual_per_crop} visual tokens per image"
                )
            sched = split_evenly(geom.visual_per_crop - self.tokens, layers)
        else:
            sched = {i: self.r for i in layers}
        sched = {i: x for i, x in sched.items() if x > 0}
        for layer, (n_in, _) in enumerate(tokens_through_layers(geom.tokens, sched, geom.num_layers)):
            r = sched.get(layer, 0)
            if r > n_in - 2:  # keep CLS and at least one target patch
                raise MethodError(
                    f"ficoco_v: layer {layer} would remove {r} of its {n_in - 1} patch tokens "
                    f"(at least one must remain; lower r / raise tokens)"
                )
        return sched

    def make_reducer(self, schedule, adapter):
        return FiCoCoVReducer(schedule, self, adapter.patches_per_side)

    def overhead_macs(self, vit, layer, n_in, r) -> int:
        """Scores: per-head QKᵀ over all n tokens (n²·d); compress: [P−r, r] x [r, d] matmul."""
        d, p = vit.hidden, n_in - 1
        return n_in * n_in * d + (p - r) * r * d


# ---- FiCoCo's TFLOPs labels ------------------------------------------------------------------------
def llava15_7b_llm_shape():
    from harness.efficiency.analytic import LLMShape

    return LLMShape(
        hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32064
    )


def ficoco_paper_tflops(visual_tokens: int, text_tokens: int = 60, llm=None) -> float:
    """FiCoCo's TFLOPs convention (LLM-Viewer; spec §0.5): LLM prefill only, 2 FLOPs per MAC, SwiGLU FFN,
    attention QKᵀ and AV, `text_tokens` (60 for 7B, 512 for 13B) plus the visual tokens entering the LLM.
    LLaVA-1.5-7B: 576 -> 8.45, 192 -> 3.30, 128 -> 2.45, 64 -> 1.61 (paper 8.5 / 3.3 / 2.4(2.5) / 1.6)."""
    from harness.efficiency.analytic import flops, llm_prefill_macs

    llm = llm or llava15_7b_llm_shape()
    return flops(llm_prefill_macs(llm, visual_tokens + text_tokens)) / 1e12
