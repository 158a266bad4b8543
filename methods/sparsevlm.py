"""SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025 (arXiv 2410.04417); official code Gumpest/SparseVLMs, branch v1.5 (read, not copied;
`llava/model/language_model/{modelling_sparse_llama,score,utils}.py`). LightCompress runs it at layers
2 / 6 / 15 of LLaVA-1.5-7B.

Algorithm (paper §3; v1.5 code where the paper leaves a detail open):

1. **Text raters** (paper §3.2), once per prefill, on the LLM input embeddings H: with H_v the visual
   tokens and H_t the text tokens after the first visual token (the question and the answer prompt, up to
   the last prompt token), relevance `m = mean_over_visual softmax_over_text(H_v H_t^T)`; the raters are
   the text tokens with `m_j > mean(m)`.
2. **Scores** at each sparsification layer l (`layers`, default 2 / 6 / 15): the head-mean softmax
   attention P [raters x visual] of layer l, computed from the layer's own post-RoPE q/k (causal, padding
   keys masked) for the text rows only; the layer's attention output itself still comes from SDPA (or the
   model's implementation). Visual token j's score is the mean of its column over the raters. The
   attention rows of every candidate text token (not only the raters') are computed, and the raters'
   rows averaged with a per-sample mask: the raters differ per prompt and per sample in a batch, and this
   keeps the counted FLOPs a function of the token layout (`llm_visual_schedule`), exactly as analytic.
3. **How many** visual tokens survive stage s (paper §3.3, "sparsification level adaptation"):
   * `mode="rank"` (the paper): `N = floor(lam * (L_v - rank(P)))` visual tokens are deleted, L_v the
     visual tokens alive, rank(P) the numerical rank of the raters' attention (torch.linalg.matrix_rank,
     float32). It depends on the image and the question, so it cannot meet a fixed budget, its FLOPs have
     no analytic formula, and samples of a batch may disagree (refused in one line: use batch size 1).
     The v1 code kept `min(int(13.5 * rank), L_v - 1)` instead; v1.5 dropped the rank for fixed lists.
     Caveat: the paper's full text was not retrievable here (only its abstract: "a rank-based strategy to
     adaptively determine the sparsification ratio for each layer"); the deletion rule above is the
     paper's as recalled, to be checked against §3.3 before `mode=rank` numbers are published.
   * `mode="fixed"` (the reconciliation with a fixed budget, as the v1.5 code's fixed-budget configs do,
     e.g. `keep=[300, 200, 110]` for its "192 tokens" on LLaVA-1.5-7B): `keep` gives the top-k kept at
     each stage (the recycled tokens come on top); or `tokens` / `keep_ratio` (precedence in this order)
     give T1, the visual tokens
     after the FIRST stage *including* the recycled ones (the project's token budget for a multi-stage
     method), and stage s keeps `round(schedule[s] * T1)` in all (default schedule 1 : 0.667 : 0.367,
     the v1.5 192-token list 300 : 200 : 110). A stage whose target is not below the tokens alive does
     nothing (no scores computed). Top-k + clusters meets every target exactly (each step of k changes the
     cluster count by 0 or 1); a target below the cluster count at k = 0 keeps no top-k token and that many
     clusters (the candidates are clustered into fewer centres).
4. **Recycling** (paper §3.4; v1.5 `cluster_and_merge`): of the N deleted tokens, the `floor(tau * N) + 1`
   with the highest scores (tau = `recycle_share`, 0.3) are clustered by DPC-kNN on their hidden states
   (the output of layer l) into `floor(candidates / cluster_size) + 1` clusters (cluster_size 10):
   distances `||x_i - x_j|| / sqrt(d)`; density `rho_i = exp(-mean of the squared distances to its c
   nearest, itself included)`; `delta_i` = distance to the nearest denser token (the densest: the largest
   distance); the c tokens with the largest `rho * delta` are centres; every candidate joins its nearest
   centre; a cluster's token is the plain mean of its members. Not reproduced: the code's random 1e-6
   density jitter (ties go to the earlier token instead, so runs are deterministic).

Positions: kept tokens keep their original RoPE positions (and Qwen2-VL's three M-RoPE streams), in
prefill, KV cache and decoding (the v1.5 code renumbers them contiguously). A recycled token is written
into its cluster centre's row: it takes the centre's original position and KV-cache slot (the code
appends the merged tokens after the kept visual tokens). Pruning happens once, at prefill (KV cache);
decode tokens continue at full-length positions (`methods._shared.llm_reduce`).

Where it acts: scores from layer l's attention, the drop (and the recycled tokens) at the input of layer
l + 1, i.e. on layer l's output as in the code. Budget (`budget.kind=tokens`): the visual tokens after
the first stage, recycled ones included; `visual_tokens_per_layer` gives the layer average the papers
call "equivalent tokens".

FLOPs (`analytic_prefill_macs`): the layers at their alive token counts, plus the rater relevance matrix
(L_v x M x d MACs, M candidate text tokens), each acting stage's text attention rows (H x M x n x d_h, QK^T
only) and its clustering distances (c_cand^2 x d, one Gram matrix). Not counted (element-wise, as the
counting rules say): softmax, RoPE, the means; in `mode="rank"` the SVD of the rank (no matrix product).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError

#: the v1.5 code's fixed per-stage top-k lists for LLaVA-1.5-7B (layers 2 / 6 / 15), by its token label
PAPER_KEEP = {192: [300, 200, 110], 128: [303, 110, 36], 64: [66, 30, 17]}
#: default `schedule`: the 192-token list's stage ratios (300 : 200 : 110)
DEFAULT_SCHEDULE = [1.0, round(200 / 300, 4), round(110 / 300, 4)]


# ---- counts -------------------------------------------------------------------------------------------
def recycled_count(pruned: int, share: float = 0.3, cluster_size: int = 10) -> tuple[int, int]:
    """(candidates, clusters) recycled out of `pruned` deleted tokens: the top floor(share * pruned) + 1
    by score, merged into floor(candidates / cluster_size) + 1 tokens (v1.5 code); (0, 0) if none."""
    if pruned <= 0:
        return 0, 0
    cand = min(int(share * pruned) + 1, pruned)
    return cand, min(cand // cluster_size + 1, cand)


def stage_total(alive: int, top_k: int, recycle: bool, share: float, cluster_size: int) -> int:
    """Visual tokens after a stage that keeps `top_k` of `alive` by score (plus the recycled clusters)."""
    return top_k + (recycled_count(alive - top_k, share, cluster_size)[1] if recycle else 0)


def top_k_for_total(alive: int, total: int, recycle: bool, share: float, cluster_size: int) -> int:
    """The top-k whose stage leaves exactly `total` visual tokens (k + clusters(alive - k) = total; the
    left side falls by 0 or 1 per step of k, so every total in [1, alive] is reached)."""
    k = total
    while k > 0 and stage_total(alive, k, recycle, share, cluster_size) > total:
        k -= 1
    return k


# ---- the selection ------------------------------------------------------------------------------------
def select_raters(hidden: torch.Tensor, visual: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Rater mask [B, n] (paper §3.2): hidden [B, n, d] the LLM input, visual / cand [B, n] bool (cand: the
    candidate text tokens). m = mean over visual rows of softmax over candidate columns of H_v H_t^T."""
    B = hidden.shape[0]
    rows = _padded_index(cand)  # [B, M], -1 padding
    hv = LR.take(hidden, _padded_index(visual).clamp(min=0))  # [B, nv, d]
    ht = LR.take(hidden, rows.clamp(min=0))  # [B, M, d]
    logits = torch.matmul(hv, ht.transpose(1, 2)).float()  # [B, nv, M]
    ok = rows >= 0
    logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
    m = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, M]
    mean = (m * ok).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    chosen = (m > mean) & ok
    n = cand.shape[1]
    out = torch.zeros(B, n + 1, dtype=torch.long, device=cand.device)  # column n: the padding's sink
    out = out.scatter(1, rows.masked_fill(rows < 0, n), chosen.long())
    return out[:, :n].bool()


def _padded_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, n] bool -> [B, max count] column indices of the True entries in order, -1 padding."""
    counts = mask.sum(1)
    M = int(counts.max()) if mask.numel() else 0
    col = torch.arange(mask.shape[1], device=mask.device)
    key = torch.where(mask, col, mask.shape[1] + col)
    idx = torch.sort(key, dim=1).values[:, :M]
    return torch.where(torch.arange(M, device=mask.device)[None] < counts[:, None], idx, -1)


def rater_attention(attn, q, k, view, rows: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention [B, M, n] (float32) of the text rows `rows` ([B, M] current columns,
    -1 padding) over all current keys, from the layer's captured q_proj/k_proj outputs and cos/sin."""
    hd = attn.head_dim
    cos, sin = view.position_embeddings
    safe = rows.clamp(min=0)
    q_r = LR.post_rope(attn, LR.heads(LR.take(q, safe), hd), LR.take(cos, safe), LR.take(sin, safe))
    k = LR.post_rope(attn, LR.heads(k, hd), cos, sin)
    n = k.shape[2]
    col = torch.arange(n, device=k.device)
    allowed = view.valid[:, None, :] & (col[None, None, :] <= safe[:, :, None])  # causal + padding
    return LR.query_row_probs(q_r, k, allowed, attn.scaling).mean(dim=1)  # [B, M, n]


def dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of x [m, d] into c clusters: (centres [c] row indices, assignment [m] in 0..c-1)."""
    m, d = x.shape
    xf = x.double()
    sq = (xf * xf).sum(1)
    gram = torch.matmul(xf, xf.t())
    idx = torch.arange(m, device=x.device)
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt() / math.sqrt(d)
    dist = dist.masked_fill(idx[:, None] == idx[None, :], 0.0)  # exact zeros on the diagonal
    knn = torch.topk(dist, k=c, dim=1, largest=False).values
    density = torch.exp(-(knn**2).mean(dim=1))
    # j is denser than i: larger density, ties to the earlier token
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    big = dist.max()
    delta = torch.where(denser, dist, big).min(dim=1).values
    score = delta * density
    centres = torch.sort(score, descending=True, stable=True).indices[:c]
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


class _SparseVLMPlan(LR.ReductionPlan):
    count_first_drop = True

    def __init__(self, method: "SparseVLM"):
        self.m = method
        self.first_layer = 0
        self.stage_of = {int(l) + 1: s for s, l in enumerate(method.layers)}  # drop layer -> stage
        self.captures: dict = {}
        self.raters = self.cand = None
        self.T1 = None

    def before_layer(self, view):
        st = view.state
        if view.layer == 0:
            visual = st.visual
            self.nv0 = LR.equal_visual_count(visual, "sparsevlm")
            end = view.score_row
            col = torch.arange(st.P, device=visual.device)
            first = torch.where(visual, col, st.P).min(1).values
            self.cand = st.valid & ~visual & (col[None] > first[:, None]) & (col[None] <= end)
            self.raters = None
            if self.m.acts(self.nv0):
                self.raters = select_raters(view.hidden, visual, self.cand)
            return None
        s = self.stage_of.get(view.layer)
        if s is None:
            return None
        q, k = self.captures[view.layer - 1].take()
        if self.raters is None:
            return None
        visual = view.visual
        nv = LR.equal_visual_count(visual, "sparsevlm")
        m = self.m
        if m.mode == "fixed":
            before, top_k, _ = m.stage_plan(self.nv0)[s]
            if top_k is None:
                return None
            if before != nv:
                raise MethodError(f"sparsevlm: stage {s} expected {before} visual tokens alive, found {nv}")
        # scores: the raters' mean attention on every visual token alive
        idx = view.index
        rows = _padded_index(self.cand.gather(1, idx))  # [B, M] current columns of the text candidates
        if rows.shape[1] == 0:
            raise MethodError("sparsevlm needs text after the first visual token (the raters)")
        probs = rater_attention(self.reducer.layers[view.layer - 1].self_attn, q, k, view, rows)
        is_rater = self.raters.gather(1, idx)  # [B, n]
        w = (is_rater.gather(1, rows.clamp(min=0)) & (rows >= 0)).float()  # [B, M] rater rows
        vcols = _padded_index(visual)  # [B, nv]
        P = probs.gather(2, vcols[:, None, :].expand(-1, probs.shape[1], -1))  # [B, M, nv]
        P = P.masked_fill(w[:, :, None] == 0, 0.0)  # non-rater rows (padding rows may be NaN: no key allowed)
        scores = (P * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)  # [B, nv]
        if m.mode == "rank":
            ks = []
            for b in range(P.shape[0]):
                Pb = P[b][w[b] > 0]
                N = int(math.floor(m.lam * (nv - int(torch.linalg.matrix_rank(Pb.float())))))
                ks.append(nv - min(max(N, 0), nv - 1))
            if len(set(ks)) > 1:
                raise MethodError(
                    f"sparsevlm mode=rank: the samples of this batch keep different counts ({', '.join(map(str, ks))}); "
                    "the rank-adaptive count needs batch size 1 (or mode=fixed)"
                )
            top_k = ks[0]
            if top_k >= nv:
                return None
        top_k = min(top_k, nv)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # visual ordinals by score
        keep_ord = order[:, :top_k]
        hidden = view.hidden
        pruned = nv - top_k
        n_cand, n_clu = recycled_count(pruned, m.recycle_share, m.cluster_size) if m.recycle else (0, 0)
        if m.mode == "fixed":
            n_clu = m.stage_plan(self.nv0)[s][2] - top_k  # the rule's count, or fewer to meet a small target
        B = hidden.shape[0]
        members = [[] for _ in range(B)]  # (member ordinal, centre ordinal) of each recycled token
        if n_clu:
            hidden = hidden.clone()
            cand_ord = order[:, top_k : top_k + n_cand]  # the deleted tokens with the highest scores
            centres = []
            for b in range(B):
                cols = vcols[b, cand_ord[b]]
                x = hidden[b, cols]
                cen, assign = dpc_knn(x, n_clu)
                merged = torch.zeros(n_clu, x.shape[1], dtype=torch.float64, device=x.device)
                merged.index_add_(0, assign, x.double())
                size = torch.zeros(n_clu, dtype=torch.float64, device=x.device)
                merged /= size.index_add_(0, assign, torch.ones_like(assign, dtype=torch.float64))[:, None]
                hidden[b, cols[cen]] = merged.to(hidden.dtype)
                centres.append(cand_ord[b, cen])
                members[b] = list(zip(cand_ord[b].tolist(), cand_ord[b, cen][assign].tolist()))
            keep_ord = torch.cat([keep_ord, torch.stack(centres)], dim=1)
        self._log_merges(view, nv, keep_ord, members)
        kept_vis = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
        kept_vis = kept_vis.scatter(1, vcols.gather(1, keep_ord), torch.ones_like(keep_ord)).bool()
        keep = (kept_vis | ~visual).nonzero()[:, 1].view(visual.shape[0], -1)
        return hidden, keep


    @staticmethod
    def _log_merges(view, nv, keep_ord, members):
        """Bookkeeping for `harness.recall` (`ReduceState.merges`, FiCoCo-L's format): at the input of
        layer l + 1 the kept visual tokens (ordinals among the nv alive, ascending) are the targets; a
        recycled token has weight 1 on its cluster's centre (which then holds 1 / cluster size of each
        member, itself included: the mean); the other deleted tokens have no weight (dropped)."""
        B = keep_ord.shape[0]
        tgt = torch.sort(keep_ord, dim=1).values
        is_kept = torch.zeros(B, nv, dtype=torch.bool, device=keep_ord.device)
        is_kept.scatter_(1, tgt, torch.ones_like(tgt, dtype=torch.bool))
        disc = (~is_kept).nonzero()[:, 1].view(B, -1)
        alpha = torch.zeros(B, disc.shape[1], tgt.shape[1])
        for b in range(B):
            d_pos = {int(o): i for i, o in enumerate(disc[b].tolist())}
            t_pos = {int(o): j for j, o in enumerate(tgt[b].tolist())}
            for member, centre in members[b]:
                if member != centre:
                    alpha[b, d_pos[member], t_pos[centre]] = 1.0
        view.state.merges[view.layer - 1] = (disc, tgt, alpha)


@register
@dataclasses.dataclass
class SparseVLM(Method):
    name = "sparsevlm"
    budget_at_first_drop = True  # budget.kind=tokens counts the visual tokens after the first drop
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values, counts from scores
    budget_tokens_param = "tokens"
    budget_param = "tokens"
    budget_ignores = ("lam",)
    #: nothing dropped at any stage: the unpatched model
    noop: ClassVar[dict | None] = {"keep_ratio": 1.0, "schedule": [1.0, 1.0, 1.0]}
    #: reduces on the 4-layer tiny test models (64 visual tokens per image): 32 -> 21 -> 12 visual tokens
    example: ClassVar[dict | None] = {"layers": [0, 1, 2], "keep_ratio": 0.5}

    #: sparsification layers (0-based): scores from layer l's attention, the drop at layer l + 1's input
    layers: list[int] | None = dataclasses.field(default_factory=lambda: [2, 6, 15])  # None is refused
    #: "fixed" (counts from keep / keep_ratio / tokens) or "rank" (the paper's rank-adaptive count)
    mode: str = "fixed"
    #: fixed: top-k visual tokens kept at each stage (the v1.5 lists; recycled tokens come on top);
    #: takes precedence over tokens / keep_ratio
    keep: list[int] | None = None
    #: fixed: visual tokens after the first stage (recycled included) as a share of the prompt's (used when
    #: keep and tokens are unset; mode=rank ignores it)
    keep_ratio: float | None = 0.333
    #: fixed: visual tokens after the first stage (recycled included), a count (takes precedence over
    #: keep_ratio)
    tokens: int | None = None
    #: fixed with keep_ratio / tokens: each stage's visual tokens as a share of the first stage's (None:
    #: 1 : 0.667 : 0.367 for three stages, else evenly spaced from 1 to 0.367)
    schedule: list[float] | None = None
    #: rank: the scaling factor lambda of N = floor(lam * (L_v - rank(P)))
    lam: float = 0.5
    #: recycle the best-scored deleted tokens (cluster and merge them back)
    recycle: bool = True
    #: share tau of the deleted tokens recycled (floor(tau * N) + 1)
    recycle_share: float = 0.3
    #: recycled tokens per cluster (clusters = floor(candidates / cluster_size) + 1)
    cluster_size: int = 10

    # ---- parameters ---------------------------------------------------------------------------------
    def check_params(self) -> None:
        p = "sparsevlm"
        L = self.layers
        if not isinstance(L, (list, tuple)) or not L or any(isinstance(x, bool) or not isinstance(x, int) for x in L):
            raise MethodError(f"{p}: layers must be a non-empty list of integers, got {L!r}")
        if L[0] < 0 or any(b <= a for a, b in zip(L, L[1:])):
            raise MethodError(f"{p}: layers must be >= 0 and strictly increasing, got {list(L)!r}")
        if self.mode not in ("fixed", "rank"):
            raise MethodError(f"{p}: mode must be 'fixed' or 'rank', got {self.mode!r}")
        if self.mode == "rank":
            for n in ("keep", "tokens"):
                if getattr(self, n) is not None:
                    raise MethodError(f"{p}: {n} is a fixed count; mode=rank sets the counts from the attention "
                                      "rank (drop it, or use mode=fixed)")
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 < float(self.lam) <= 1.0:
                raise MethodError(f"{p}: lam must be a number in (0, 1], got {self.lam!r}")
        elif self.keep is not None and self.tokens is not None:
            raise MethodError(f"{p}: keep (top-k per stage) and tokens (the first stage's total) both set; give one")
        elif self.keep is None and self.tokens is None and self.keep_ratio is None:
            raise MethodError(f"{p}: mode=fixed needs one of keep, tokens, keep_ratio")
        if self.keep is not None:
            k = self.keep
            if not isinstance(k, (list, tuple)) or len(k) != len(L) or any(
                    isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in k):
                raise MethodError(f"{p}: keep must list one integer >= 1 per layer ({len(L)}), got {k!r}")
            if any(b > a for a, b in zip(k, k[1:])):
                raise MethodError(f"{p}: keep must be non-increasing, got {list(k)!r}")
        kr = self.keep_ratio
        if kr is not None and (isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0):
            raise MethodError(f"{p}: keep_ratio must be a number in (0, 1], got {kr!r}")
        t = self.tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise MethodError(f"{p}: tokens must be an integer >= 1, got {t!r}")
        sc = self.shares()
        if not isinstance(sc, (list, tuple)) or len(sc) != len(L) or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) <= 1.0 for x in sc):
            raise MethodError(f"{p}: schedule must list one number in (0, 1] per layer ({len(L)}), got {sc!r}")
        if float(sc[0]) != 1.0 or any(float(b) > float(a) for a, b in zip(sc, sc[1:])):
            raise MethodError(f"{p}: schedule must start at 1.0 and be non-increasing, got {list(sc)!r}")
        if not isinstance(self.recycle, bool):
            raise MethodError(f"{p}: recycle must be true or false, got {self.recycle!r}")
        rs = self.recycle_share
        if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not 0.0 <= float(rs) <= 1.0:
            raise MethodError(f"{p}: recycle_share must be a number in [0, 1], got {rs!r}")
        cs = self.cluster_size
        if isinstance(cs, bool) or not isinstance(cs, int) or cs < 1:
            raise MethodError(f"{p}: cluster_size must be an integer >= 1, got {cs!r}")

    def check_run(self, run: dict) -> None:
        """`mode=rank` keeps a count that depends on each prompt: no analytic FLOPs for the efficiency probe's
        counted == analytic check, and the samples of a batch may disagree; refused before anything loads."""
        if self.mode != "rank":
            return
        if int(run.get("batch_size") or 1) > 1:
            raise MethodError(f"method.params.mode=rank: sparsevlm's rank-adaptive count differs per prompt; it "
                              f"needs run.batch_size=1 (got {run.get('batch_size')}), or use mode=fixed")
        if (run.get("efficiency") or {}).get("enabled", True):
            raise MethodError("method.params.mode=rank: sparsevlm's rank-adaptive count has no analytic FLOPs to "
                              "check the efficiency probe against; set run.efficiency.enabled=false, or use mode=fixed")

    def validate(self, adapter) -> None:
        super().validate(adapter)
        if self._noop():
            return
        self.require_full_attention(adapter)
        L = adapter.num_llm_layers
        if self.layers[-1] + 1 >= L:
            raise MethodError(f"sparsevlm: layer {self.layers[-1]} leaves no layer to drop at (the drop is at "
                              f"layer l + 1; this language model has {L} layers)")

    def shares(self) -> list[float]:
        """`schedule`, or its default for this many stages."""
        if self.schedule is not None:
            return self.schedule
        n = len(self.layers)
        if n == len(DEFAULT_SCHEDULE):
            return list(DEFAULT_SCHEDULE)
        last = DEFAULT_SCHEDULE[-1]
        return [1.0] + [round(1.0 - (1.0 - last) * i / (n - 1), 4) for i in range(1, n)]

    def _noop(self) -> bool:
        return self.mode == "fixed" and self.keep is None and self.tokens is None and self.keep_ratio is not None and \
            float(self.keep_ratio) >= 1.0 and all(float(x) >= 1.0 for x in self.shares())

    # ---- counts -------------------------------------------------------------------------------------
    def stage_targets(self, nv: int) -> list[int]:
        """fixed mode with keep_ratio / tokens: each stage's target visual tokens for `nv` entering."""
        t1 = min(nv, int(self.tokens) if self.tokens is not None else int(round(nv * float(self.keep_ratio))))
        return [max(1, int(round(float(f) * t1))) for f in self.shares()]

    def stage_plan(self, nv: int) -> list[tuple[int, int | None, int]]:
        """fixed mode, per stage: (visual tokens alive before it, its top-k or None if it does nothing,
        visual tokens alive after it, recycled included), for a prompt with `nv` entering the LLM. A stage
        acts when its top-k (`keep`) or its target (`keep_ratio` / `tokens`) is below the tokens alive."""
        out, alive = [], nv
        targets = None if self.keep is not None else self.stage_targets(nv)
        for s in range(len(self.layers)):
            if self.keep is not None:
                k = int(self.keep[s]) if int(self.keep[s]) < alive else None
            else:
                k = top_k_for_total(alive, targets[s], self.recycle, self.recycle_share, self.cluster_size) \
                    if targets[s] < alive else None
            after = alive if k is None else stage_total(alive, k, self.recycle, self.recycle_share, self.cluster_size)
            if targets is not None and k is not None:
                after = min(after, targets[s])  # below the rule's cluster count at k = 0: fewer clusters
            out.append((alive, k, after))
            alive = after
        return out

    def acts(self, nv: int) -> bool:
        if self.mode == "rank":
            return True
        return any(k is not None for _, k, _ in self.stage_plan(nv))

    def visual_tokens_kept(self, layout) -> int:
        """The budget count: visual tokens after the first stage (recycled included)."""
        if self.mode == "rank":
            raise MethodError("sparsevlm mode=rank: the counts depend on the attention rank of each prompt")
        return self.stage_plan(layout.visual)[0][2]

    def budget_token_params(self, value: float) -> dict:
        base = {"mode": "fixed", "keep": None}
        if float(value) > 1:
            return base | {"tokens": int(value), "keep_ratio": None}
        return base | {"tokens": None, "keep_ratio": float(value)}

    def budget_params(self, value) -> dict:
        return {"mode": "fixed", "keep": None, "keep_ratio": None, "tokens": int(value)}

    def budget_candidates(self, adapter) -> list:
        return list(range(1, adapter.visual_tokens_per_image + 1))

    def apply(self, model, adapter):
        self.validate(adapter)
        if self._noop():
            return model
        plan = _SparseVLMPlan(self)
        red = LR.install(model, adapter, plan)
        # own q/k captures of the scoring layers (read at the next layer's input, so the reducer's release
        # of a wrapped layer's captures must not touch them)
        plan.captures = {
            int(l): LR.QKCapture(red.layers[int(l)].self_attn, lambda: red.ctx.is_prefill) for l in self.layers
        }
        return model

    # ---- FLOPs --------------------------------------------------------------------------------------
    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """Visual tokens at each layer's input and the selection's own MACs (rater relevance, each acting
        stage's text attention rows and clustering Gram matrix); None when nothing is dropped."""
        if self.mode == "rank":
            raise MethodError("sparsevlm mode=rank has no analytic FLOPs (the counts depend on each prompt's "
                              "attention rank); use mode=fixed, or run it without the efficiency probe "
                              "(run.efficiency.enabled=false, run.batch_size=1)")
        s, nv = shapes.llm, layout.visual
        if not self.acts(nv):
            return None
        text = layout.text
        M = layout.between + layout.after  # candidate raters: text after the first visual token
        per_layer = [nv] * s.layers
        extra = nv * M * s.hidden  # H_v H_t^T
        for (before, k, after), l in zip(self.stage_plan(nv), self.layers):
            if k is None:
                continue
            extra += s.heads * M * (text + before) * s.head_dim  # the text rows' QK^T
            cand = recycled_count(before - k, self.recycle_share, self.cluster_size)[0] if self.recycle else 0
            if after > k:  # clusters
                extra += cand * cand * s.hidden  # the clustering's Gram matrix
            for j in range(l + 1, s.layers):
                per_layer[j] = after
        return per_layer, extra

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        return A.scheduled_prefill_macs(shapes, layout, self.llm_visual_schedule(shapes, layout))
        per_layer, extra = schedule
        macs["llm"] = sum(A.llm_layer_macs(shapes.llm, layout.with_visual(v).total) for v in per_layer) + extra
        return macs
