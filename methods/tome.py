"""ToMe — Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), applied inside
the CLIP vision tower of a LLaVA model so the projector and the LLM receive fewer visual tokens.

Per CLIP layer that merges (between the attention residual and LN2/MLP), with r tokens to remove:

* metric: the layer's keys averaged over heads, L2-normalised (`k.mean(heads)`, N x d_h);
* bipartite soft matching: A = tokens at even indices (CLS = index 0 is in A and never merged),
  B = odd indices; cosine scores S = A·Bᵀ; each a in A picks its best b; the r a-tokens with the highest
  best-score are merged into their b (the rest of A stays);
* size-weighted merge: x_b <- (s_b x_b + Σ_{a->b} s_a x_a) / (s_b + Σ s_a), s_b <- s_b + Σ s_a, where s
  counts the original patches a token stands for;
* proportional attention (`prop_attn`, ToMe's default for off-the-shelf models): in every later layer the
  attention logits get `+ log s_j` for key j (an additive float mask to SDPA);
* output order `[unmerged A (original order, CLS first), B]` (ToMe's order; `order="spatial"` re-sorts
  tokens by the smallest original patch index they contain, an option not in ToMe).

Where it runs: layers 0..`adapter.last_useful_vision_layer` (22 of 24 for LLaVA's `vision_feature_layer=-2`;
merging in layer 23 would be wasted). The reduced count reaches the LLM by shrinking the image placeholder
run (`methods/_shared/vision_reduce.py`).

Budgets. `r` (int) merges r tokens in every useful layer (r=16 -> 576 - 23·16 = 208 visual tokens for
LLaVA-1.5, the run FiCoCo's repo logged); `r` (list) gives r per layer index (0 after the list);
`tokens` (T) asks for exactly T visual tokens per image/crop: 576 - T removals are spread over the useful
layers, each getting ⌊R/L⌋ and the last R mod L one more (T=192 -> 7x16 + 16x17; 128 -> 12x19 + 11x20;
64 -> 17x22 + 6x23). Each layer's r is capped by bipartite matching at ⌈N/2⌉ - 1 (CLS protected).

`prompt_tokens` (a count or a share of the prompt's visual tokens, what `budget.kind=tokens` sets) asks for
that many visual tokens for the whole prompt: every crop of the prompt gets the same k, the nearest
(`VisionReductionMethod.crop_tokens`), and the schedule for k is chosen per forward.

LLaVA-NeXT: every anyres crop (base and high-res) is merged independently to the same count k; the image
is packed as [crop tokens..., image_newline] without the 2-D unpad/newline grid (see vision_reduce).

FLOPs (analytic, MACs): per crop, patch embedding + Σ_l `vit_layer_macs(n_l, n_l - r_l)` + per merging
layer the matching matmul ⌈n_l/2⌉·⌊n_l/2⌋·d_h; projector and LLM over the reduced visual count.
"""
from __future__ import annotations

import dataclasses

import torch

from methods import register
from methods._shared.vision_reduce import (
    VisionGeometry,
    VisionReducer,
    VisionReductionMethod,
    ceil_div,
    check_prompt_tokens,
    gather_tokens,
    split_evenly,
    tokens_through_layers,
)
from methods.base import MethodError


class ToMeReducer(VisionReducer):
    def __init__(self, schedule, *, prop_attn: bool, order: str):
        super().__init__(schedule)
        self.prop_attn = prop_attn
        self.order = order

    def reduce(self, layer, x, q, k, state, r):
        B, N, D = x.shape
        metric = k.mean(1)  # [B, N, dh]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        scores[:, 0, :] = -torch.inf  # CLS (index 0, in A) is never merged
        node_max, node_idx = scores.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True, stable=True)
        src_idx, unm_idx = edge[:, :r], edge[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)

        size = state.size if state.size is not None else torch.ones(B, N, dtype=x.dtype, device=x.device)
        pos = state.pos
        xs = x * size[..., None]
        xa, xb = xs[:, ::2], xs[:, 1::2]
        sa, sb = size[:, ::2], size[:, 1::2]
        pa, pb = pos[:, ::2], pos[:, 1::2]
        xb = xb.scatter_reduce(1, dst_idx[..., None].expand(B, r, D), gather_tokens(xa, src_idx), reduce="sum")
        sb = sb.scatter_reduce(1, dst_idx, sa.gather(1, src_idx), reduce="sum")
        pb = pb.scatter_reduce(1, dst_idx, pa.gather(1, src_idx), reduce="amin")
        x_new = torch.cat([gather_tokens(xa, unm_idx), xb], dim=1)
        size_new = torch.cat([sa.gather(1, unm_idx), sb], dim=1)
        pos_new = torch.cat([pa.gather(1, unm_idx), pb], dim=1)
        x_new = x_new / size_new[..., None]
        src_new = None
        if state.track:  # content bookkeeping (asked-cell recall): the same size-weighted merge of the shares
            share = state.source if state.source is not None else torch.eye(N, device=x.device).expand(B, N, N)
            counts = share * size[..., None].float()
            s_a, s_b = counts[:, ::2], counts[:, 1::2]
            s_b = s_b.scatter_reduce(1, dst_idx[..., None].expand(B, r, counts.shape[2]), gather_tokens(s_a, src_idx), reduce="sum")
            src_new = torch.cat([gather_tokens(s_a, unm_idx), s_b], dim=1) / size_new[..., None].float()
        if self.order == "spatial":
            idx = pos_new.argsort(dim=-1, stable=True)
            x_new, size_new, pos_new = gather_tokens(x_new, idx), size_new.gather(1, idx), pos_new.gather(1, idx)
            src_new = gather_tokens(src_new, idx) if src_new is not None else None
        state.size, state.pos = size_new, pos_new
        state.source = src_new
        return x_new


def front_load(sched: dict[int, int], layers: list[int], n0: int) -> dict[int, int]:
    """An even `tokens` schedule made feasible for bipartite matching (at most ⌈n/2⌉ − 1 merges in a
    layer that receives n tokens, CLS protected): a layer over its cap keeps the cap and hands the
    excess to the layer before it, repeated until nothing moves. Shallow towers (few layers before
    the feature layer) thus reach small budgets by merging more early; if even the first layer
    cannot take the excess, the schedule is returned as is and the caller's check reports it."""
    sched = {layer: sched.get(layer, 0) for layer in layers}
    for _ in range(sum(sched.values()) * len(layers) + 1):  # each pass moves >= 1 merge one layer earlier
        moved = False
        n = n0
        caps = {}
        for layer in layers:
            caps[layer] = ceil_div(n, 2) - 1
            n -= min(sched[layer], caps[layer])
        for j in range(len(layers) - 1, 0, -1):
            layer, prev = layers[j], layers[j - 1]
            excess = sched[layer] - caps[layer]
            if excess > 0:
                sched[layer] -= excess
                sched[prev] += excess
                moved = True
                break
        if not moved:
            break
    return sched


@register
@dataclasses.dataclass
class ToMe(VisionReductionMethod):
    name = "tome"
    noop = {"r": 0}
    example = {"tokens": 16}
    budget_tokens_param = "prompt_tokens"
    budget_param = "tokens"

    #: tokens merged per useful CLIP layer (int), or per layer index (list); 0 = no merging
    r: int | list[int] = 0
    #: target visual tokens per image/crop reaching the LLM (overrides r), e.g. 192 / 128 / 64 of 576
    tokens: int | None = None
    #: visual tokens reaching the LLM for the whole prompt (all images, crops and NeXT newlines): a count
    #: (> 1) or a share (<= 1) of the prompt's visual tokens; overrides tokens / r. Each crop gets the
    #: same k, the nearest to the target (token budgets, see harness/budget.py)
    prompt_tokens: float | None = None
    #: proportional attention: + log(size) on key logits after merges (ToMe default for off-the-shelf ViTs)
    prop_attn: bool = True
    #: "tome": [unmerged A, B] as ToMe emits; "spatial": sorted by smallest original patch index
    order: str = "tome"

    def check_params(self) -> None:
        check_prompt_tokens(self)
        if self.order not in ("tome", "spatial"):
            raise MethodError(f"tome: order must be 'tome' or 'spatial', got {self.order!r}")
        rs = self.r if isinstance(self.r, (list, tuple)) else [self.r]
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in rs):
            raise MethodError(f"tome: r must be a non-negative integer or a list of them, got {self.r!r}")
        if self.tokens is not None:
            if not isinstance(self.tokens, int) or self.tokens < 1:
                raise MethodError(f"tome: tokens must be a positive integer, got {self.tokens!r}")
            if any(rs):
                raise MethodError("tome: give either tokens or r, not both")

    def schedule(self, geom: VisionGeometry) -> dict[int, int]:
        useful = list(range(geom.last_useful + 1))
        if self.tokens is not None:
            if self.tokens > geom.visual_per_crop:
                raise MethodError(
                    f"tome: tokens={self.tokens} exceeds the {geom.visual_per_crop} visual tokens per image"
                )
            sched = front_load(split_evenly(geom.visual_per_crop - self.tokens, useful), useful, geom.tokens)
        elif isinstance(self.r, (list, tuple)):
            if len(self.r) > geom.num_layers:
                raise MethodError(
                    f"tome: r has {len(self.r)} entries but the vision tower has {geom.num_layers} layers"
                )
            late = [i for i, x in enumerate(self.r) if x and i > geom.last_useful]
            if late:
                raise MethodError(
                    f"tome: r merges in layer {late[0]}, after the last layer feeding the LLM ({geom.last_useful})"
                )
            sched = {i: x for i, x in enumerate(self.r)}
        else:
            sched = {i: self.r for i in useful}
        sched = {i: x for i, x in sched.items() if x > 0}
        for layer, (n_in, _) in enumerate(tokens_through_layers(geom.tokens, sched, geom.num_layers)):
            r = sched.get(layer, 0)
            cap = ceil_div(n_in, 2) - 1  # A-set size minus the protected CLS
            if r > cap:
                raise MethodError(
                    f"tome: layer {layer} would merge {r} tokens but bipartite matching allows at most {cap} "
                    f"of its {n_in} (lower r / raise tokens)"
                )
        return sched

    def make_reducer(self, schedule, adapter):
        return ToMeReducer(schedule, prop_attn=self.prop_attn, order=self.order)

    def overhead_macs(self, vit, layer, n_in, r) -> int:
        """Matching: the [⌈n/2⌉, d_h] x [d_h, ⌊n/2⌋] cosine-similarity matmul (merging is scatter-adds)."""
        return ceil_div(n_in, 2) * (n_in // 2) * (vit.hidden // vit.heads)
