"""FiCoCo-L — Han et al., "Filter, Correlate, Compress: Training-Free Token Reduction for MLLM
Acceleration" (arXiv 2411.17686 v4, AAAI 2026; v1 "Rethinking Token Reduction in MLLMs"), §4, App. 9,
Alg. 2; spec token_methods.md §3.4 (paper), §3.5 (reference code), §3.7 (hyper-parameters).

In every decoder layer of [start_layer, end_layer], between the attention residual and the MLP, r_l
visual tokens are removed and their information merged into the kept visual tokens:

1. **Filter** (eq. 3): redundancy `s_i = beta * (1/N) sum_{j in V} A_ij - (1-beta) * task_i`; the r_l
   visual tokens with the largest s are discarded (set S), the other visual tokens are targets (T).
2. **Correlate** (eq. 4): `C_ij = gamma * A_ij + (1-gamma) * indirect_ij` for i in S, j in T.
3. **Compress** (eq. 2): `tau_i = quantile(C_i, eps)`, `J_i = {j : C_ij >= tau_i}`,
   `alpha_ij = C_ij / sum_{J_i} C_ij'`, `X_j <- (X_j + sum_i alpha_ij X_i) / (1 + sum_i alpha_ij)`.

`A` is the layer's head-mean attention, computed here from the layer's own post-RoPE q/k for the rows
needed only (visual and text rows, in row blocks that skip the keys no row of the block can see; the
attention output itself still comes from SDPA). Text = the non-visual prompt tokens after the prompt's
first visual token (the instruction, and the text between images), M of them. With several visual spans
(several images) the row blocks do not skip keys (one block against all keys), so the cost does not
depend on which tokens earlier layers merged.

Variants (`variant`):
* `"paper"` (default): A = causal softmax attention (padding keys masked), head mean. In a causal LLM
  the literal eq. 3/4 terms `A_{i,k}` (visual i -> later text k) are identically 0, so the task term and
  the indirect term use what the prose describes — attention the visual tokens *receive* from the text:
  `task_i = (1/M) sum_k A_{k,i}`, `indirect_ij = (1/M) sum_k A_{k,i} A_{k,j}`. Self-preserving
  normalized compress (eq. 2).
* `"code"`: the released code (spec §3.5): S = head-mean *pre-softmax* logits `QK^T/sqrt(d_h)` over the
  (visual + text) span, un-masked (future positions included); filter `beta * sum_{j in V} S_ij -
  (1-beta) * mean_{k in Text} S_ik`; `C = gamma S[V,V] + (1-gamma) S[V,Text] S[Text,V]` (diagonal -inf);
  one k per layer = the max over discarded rows of #{C_ij > quantile(C_i, eps)}; weights = top-k of
  softmax(C_i) over all visual columns (discarded ones included: their share is lost), renormalized;
  un-normalized compress `X_j <- X_j + sum_i alpha_ij X_i`. Not reproduced: the hard-coded 576-token
  span starting at position 0 (we read the visual span from the ids) and the decode position offset.

Schedule: `r` tokens per layer (the code's rule: a layer removes r while more than r visual tokens
remain), an explicit per-layer `schedule`, `final_tokens` (visual tokens left after the last merge
layer; 576 - final spread evenly over the merge layers, earlier layers taking the remainder), or
`final_ratio` (the fraction of the visual tokens entering the LLM that is left after the last merge
layer: final = max(1, round(final_ratio * n_visual)), n_visual = the per-sample visual-token count of
the prefill, then spread as for `final_tokens`). The paper's budgets 3.3/2.4/1.5 TFLOPs are reported as
~192/128/64 final tokens for LLaVA-1.5-7B (spec §3.5).

LLaVA-NeXT: the "visual tokens" are every `<image>` placeholder the LLM receives, i.e. the packed
anyres crops *and* the `image_newline` tokens (their count depends on the image size; all samples of a
batch need the same count). `final_tokens` is an absolute count over that packed sequence, so it has no
fixed meaning across image sizes; `final_ratio` keeps the same share whatever the packing.

Positions: kept tokens keep their RoPE positions (`"keep"`) or are renumbered contiguously
(`"renumber"`, as the code does in prefill). KV cache: layer l caches the tokens present at its
attention (before its merge); decode is not reduced.
"""
from __future__ import annotations

import dataclasses

import torch

from harness.efficiency import analytic as A
from methods import register
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


# ---- schedule ---------------------------------------------------------------------------------------
def ratio_final_tokens(n_visual: int, final_ratio: float) -> int:
    """Visual tokens left by `final_ratio` for an input with `n_visual` of them (at least 1)."""
    return max(1, round(float(final_ratio) * n_visual))


def final_count(n_visual: int, final_tokens, final_ratio) -> int | None:
    """The final visual-token target of a `final_tokens` / `final_ratio` budget (None: neither set)."""
    if final_ratio is not None:
        return ratio_final_tokens(n_visual, final_ratio)
    return final_tokens


def merge_schedule(n_visual: int, layers: list[int], r: int, schedule, final_tokens) -> dict[int, int]:
    """Tokens removed at each merge layer for an input with `n_visual` visual tokens."""
    if final_tokens is not None:
        total = max(n_visual - int(final_tokens), 0)
        base, extra = divmod(total, len(layers))
        return {layer: base + (1 if j < extra else 0) for j, layer in enumerate(layers)}
    if schedule is not None:
        out, left = {}, n_visual
        for layer, rl in zip(layers, schedule):
            rl = min(int(rl), max(left - 1, 0))
            out[layer] = rl
            left -= rl
        return out
    out, left = {}, n_visual
    for layer in layers:
        rl = r if left - r > 0 else 0
        out[layer] = rl
        left -= rl
    return out


# ---- the plan ------------------------------------------------------------------------------------------
class _FiCoCoLPlan(LR.ReductionPlan):
    def __init__(self, m: "FiCoCoL", layers: list[int]):
        self.m = m
        self.layers = layers
        self.first_layer = layers[0]
        self.positions = m.positions
        self.sched: dict[int, int] = {}

    def score_layers(self):
        return list(self.layers)

    def before_layer(self, view):
        if view.layer == self.first_layer:
            nv = LR.equal_visual_count(view.visual, "ficoco_l")
            m = self.m
            ref = LR.prompt_visual_count(view, nv) if m._share_of_prompt else nv
            final = final_count(ref, m.final_tokens, m.final_ratio)
            self.sched = merge_schedule(nv, self.layers, m.r, m.schedule, final) if nv else {}
            view.state.contiguous = LR.visual_is_one_span(view.state.visual)
        return None

    def merges_at(self, layer):
        return self.sched.get(layer, 0) > 0

    def after_attention(self, view, qk):
        layer = self.reducer.layers[view.layer]
        return ficoco_merge(self.m, layer.self_attn, view, qk, self.sched[view.layer])


def _spans(view):
    """Visual and text columns of the current sequence, per sample, and the row range [c0, c1).

    Text = the valid non-visual tokens after the prompt's first visual token (in the prefill, so
    several images' in-between text counts and the set never depends on which tokens were merged)
    and up to the scoring row; c0 = the first current column at or after that token."""
    visual, valid = view.visual, view.valid
    B, n = visual.shape
    c1 = view.score_row + 1
    col = torch.arange(n, device=visual.device)
    P = view.state.visual.shape[1]
    pcol = torch.arange(P, device=visual.device)
    first = torch.where(view.state.visual, pcol, P).min(dim=1).values  # prefill index of the first visual
    after = view.index >= first[:, None]
    text = valid & ~visual & after & (view.index > first[:, None]) & (col[None] < c1)
    c0 = int(torch.where(after, col, n).min(dim=1).values.min())
    return visual, text, c0, c1


def _index_of(mask: torch.Tensor):
    """Column indices of True entries per row, padded to the max count: (idx [B, m], ok [B, m])."""
    counts = mask.sum(1)
    m = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    ok = torch.arange(m, device=mask.device)[None] < counts[:, None]
    return order, ok


#: query rows per block of the score computation (below)
SCORE_BLOCK = 128


def score_blocks(n_rows: int, n_visual: int) -> list[tuple[int, int]]:
    """Row blocks [a, b) of the query rows (visual rows in blocks of SCORE_BLOCK, then the text rows)."""
    out = [(a, min(a + SCORE_BLOCK, n_visual)) for a in range(0, n_visual, SCORE_BLOCK)]
    return out + ([(n_visual, n_rows)] if n_rows > n_visual else [])


def score_key_macs(before: int, n_visual: int, n_text: int, hw: int, contiguous: bool = True) -> int:
    """MACs of the score logits of one batch-1 prefill merge layer: each row block against the keys
    up to its last row (visual block [a, b): before + b keys; the text rows: all before + v + M); with
    several visual spans one block of all v + M rows against all n keys."""
    n = before + n_visual + n_text
    if not contiguous:
        return hw * (n_visual + n_text) * n
    return hw * sum((b - a) * (before + b if a < n_visual else n) for a, b in score_blocks(n_visual + n_text, n_visual))


def head_mean_attention(qh, kh, rows, valid, vis_idx, scaling, blocked: bool = True):
    """`A[b, i, j]`: head-mean causal softmax attention of query rows `rows` [B, R] (sequence positions,
    ascending within each block) to the visual keys `vis_idx` [B, v], padding keys masked: [B, R, v].

    Row blocks (`score_blocks`) skip the keys that no row of the block can see: with the visual rows
    first, the visual-visual triangle costs about half the full square. Exact up to float rounding: a
    skipped key has probability 0 (a test compares with the unblocked computation). `blocked=False`
    (a prompt whose visual tokens form several spans, where the keys a block can see would depend on
    which tokens earlier layers merged) scores all rows in one block against the keys up to the last row."""
    nv = vis_idx.shape[1]
    out = []
    blocks = score_blocks(rows.shape[1], nv) if blocked else [(0, rows.shape[1])]
    for a, b in blocks:
        r = rows[:, a:b]
        kmax = int(r.max()) + 1  # keys past every row of the block are masked for all of them
        allowed = valid[:, None, :kmax] & (torch.arange(kmax, device=r.device)[None, None] <= r[..., None])
        att = LR.query_row_probs(qh[:, :, a:b], kh[:, :, :kmax], allowed, scaling).mean(1)  # [B, b-a, kmax]
        att = torch.nn.functional.pad(att, (0, max(int(vis_idx.max()) + 1 - kmax, 0)))
        out.append(LR.take(att, vis_idx, 2))
    return torch.cat(out, dim=1)


def ficoco_merge(m: "FiCoCoL", attn, view, qk, r: int):
    """One FiCoCo-L filter-correlate-compress step on the post-attention hidden states."""
    q, k = qk
    hd = attn.head_dim
    cos, sin = view.position_embeddings
    visual, text, c0, c1 = _spans(view)
    B, n, d = view.hidden.shape
    nv = int(visual[0].sum())
    vis_idx, _ = _index_of(visual)  # [B, v]
    txt_idx, txt_ok = _index_of(text)  # [B, M]
    M = txt_ok.sum(1).clamp(min=1).to(torch.float32)  # [B]

    tmask = txt_ok[..., None].float()
    if m.variant == "paper":
        # query rows: the visual tokens, then the text tokens (a padded text slot borrows the first visual
        # row, so no row is fully masked; tmask zeroes it below)
        txt_idx = torch.where(txt_ok, txt_idx, vis_idx[:, :1])
        rows = torch.cat([vis_idx, txt_idx], dim=1)  # [B, v+M] sequence positions
        q_rows = LR.take(q, rows)
        cs = [LR.take(t, rows) for t in (cos, sin)]
        qh = LR.post_rope(attn, LR.heads(q_rows, hd), *cs)
        kh = LR.post_rope(attn, LR.heads(k, hd), cos, sin)
        att = head_mean_attention(qh, kh, rows, view.valid, vis_idx, attn.scaling,
                                  blocked=getattr(view.state, "contiguous", True))  # [B, v+M, v]
        A_vv = att[:, :nv]  # [B, v, v]
        A_tv = att[:, nv:] * tmask  # [B, M, v]: text rows -> visual keys
        redundancy = m.beta * A_vv.mean(-1) - (1 - m.beta) * A_tv.sum(1) / M[:, None]
    else:
        qh = LR.post_rope(attn, LR.heads(q[:, c0:c1], hd), cos[:, c0:c1], sin[:, c0:c1])
        kh = LR.post_rope(attn, LR.heads(k[:, c0:c1], hd), cos[:, c0:c1], sin[:, c0:c1])
        kh = LR.repeat_kv(kh, qh.shape[1] // kh.shape[1])
        att = (torch.matmul(qh, kh.transpose(-1, -2)) * attn.scaling).float().mean(1)  # [B, R, R]
        att = torch.nn.functional.pad(att, (c0, n - c1))  # columns back to sequence positions

        def rows_of(idx):  # rows of att for sequence positions idx (row i of att is position c0 + i)
            return LR.take(att, (idx - c0).clamp(min=0))

        A_vv = LR.take(rows_of(vis_idx), vis_idx, 2)  # [B, v, v]
        A_vt = LR.take(rows_of(vis_idx), txt_idx, 2) * txt_ok[:, None, :].float()  # [B, v, M]
        A_tv = LR.take(rows_of(txt_idx), vis_idx, 2) * tmask
        redundancy = m.beta * A_vv.sum(-1) - (1 - m.beta) * A_vt.sum(-1) / M[:, None]

    disc = torch.topk(redundancy, r, dim=1).indices  # [B, r] visual ordinals (discarded)
    is_disc = torch.zeros(B, nv, dtype=torch.bool, device=q.device).scatter(1, disc, torch.ones_like(disc, dtype=torch.bool))
    tgt = torch.sort(torch.where(is_disc, nv, torch.arange(nv, device=q.device)[None]), dim=1).values[:, : nv - r]
    disc = torch.sort(disc, dim=1).values

    X = view.hidden
    X_v = LR.take(X, vis_idx)  # [B, v, d]
    X_s = LR.take(X_v, disc)
    if m.variant == "paper":
        W = LR.take(A_tv, disc, 2)  # [B, M, r]
        Tt = LR.take(A_tv, tgt, 2)  # [B, M, v-r]
        indirect = torch.matmul(W.transpose(1, 2), Tt) / M[:, None, None]  # [B, r, v-r]
        C = m.gamma * LR.take(LR.take(A_vv, disc), tgt, 2) + (1 - m.gamma) * indirect
        tau = torch.quantile(C, m.epsilon, dim=2, keepdim=True)
        Cj = torch.where(C >= tau, C, torch.zeros_like(C))
        den = Cj.sum(2, keepdim=True)
        alpha = torch.where(den > 0, Cj / den.clamp(min=1e-30), torch.zeros_like(Cj))  # [B, r, v-r]
        moved = torch.matmul(alpha.transpose(1, 2).to(X.dtype), X_s)  # [B, v-r, d]
        X_t = LR.take(X_v, tgt)
        X_t = (X_t + moved) / (1 + alpha.sum(1))[..., None].to(X.dtype)
    else:
        A_sT = LR.take(A_vt, disc)  # [B, r, M]
        indirect = torch.matmul(A_sT, A_tv)  # [B, r, v]
        C = m.gamma * LR.take(A_vv, disc) + (1 - m.gamma) * indirect
        C = C.scatter(2, disc[..., None], float("-inf"))  # diagonal
        tau = torch.quantile(C, m.epsilon, dim=2, keepdim=True)
        kk = max(int((C > tau).sum(2).max()), 1)
        p = torch.softmax(C, dim=2)
        top = torch.topk(p, kk, dim=2)
        w = top.values / top.values.sum(2, keepdim=True)
        full = torch.zeros_like(p).scatter(2, top.indices, w)  # [B, r, v]
        alpha = LR.take(full, tgt, 2)  # shares to kept targets
        moved = torch.matmul(alpha.transpose(1, 2).to(X.dtype), X_s)
        X_t = LR.take(X_v, tgt) + moved

    view.state.merges[view.layer] = (disc, tgt, alpha.detach().float())  # bookkeeping (harness.recall)
    # write the targets back and keep every non-visual token + the targets
    tgt_pos = vis_idx.gather(1, tgt)  # sequence positions of targets
    X = X.scatter(1, tgt_pos[..., None].expand(-1, -1, d), X_t)
    disc_pos = vis_idx.gather(1, disc)
    drop = torch.zeros(B, n, dtype=torch.bool, device=X.device).scatter(1, disc_pos, torch.ones_like(disc_pos, dtype=torch.bool))
    keep = torch.arange(n, device=X.device).expand(B, n)[~drop].view(B, n - r)
    return X, keep


# ---- the method ----------------------------------------------------------------------------------------
@register
@dataclasses.dataclass
class FiCoCoL(Method):
    name = "ficoco_l"
    noop = {"r": 0}
    example = {"start_layer": 1, "final_ratio": 0.3}
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    budget_tokens_param = "final_tokens"
    budget_param = "final_tokens"
    #: set by FiCoCo-VL's per-prompt budget: `final_ratio` is a share of the prompt's visual tokens before
    #: the vision stage (`llm_reduce.prompt_visual_count`), not of those entering the LLM
    _share_of_prompt = False

    #: first merging decoder layer (0-based); paper: "starts at the 4-th layer"; code: 5
    start_layer: int = 4
    #: last merging decoder layer (None: the last layer)
    end_layer: int | None = None
    #: visual tokens removed per merge layer (code default 14: 576 - 27*14 = 198 with layers 5..31)
    r: int = 14
    #: explicit per-layer removal counts for layers start..end (overrides r)
    schedule: list | None = None
    #: visual tokens left after the last merge layer (overrides r and schedule), e.g. 192/128/64
    final_tokens: int | None = None
    #: fraction in (0, 1] of the visual tokens entering the LLM left after the last merge layer
    #: (max(1, round(final_ratio * n_visual))); overrides r; not with final_tokens / schedule
    final_ratio: float | None = None
    #: filter weight of the vision-aware term (eq. 3)
    beta: float = 0.6
    #: correlate weight of the direct term (eq. 4)
    gamma: float = 0.6
    #: quantile of the token-adaptive threshold
    epsilon: float = 0.998
    #: "paper" (causal attention, normalized compress) or "code" (reference-code behaviour, §3.5)
    variant: str = "paper"
    #: "keep" original RoPE positions or "renumber" contiguously after each merge
    positions: str = "keep"

    def check_params(self) -> None:
        def bad(msg):
            raise MethodError(f"ficoco_l: {msg}")

        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            bad(f"start_layer must be a non-negative integer, got {self.start_layer!r}")
        if self.end_layer is not None and (not isinstance(self.end_layer, int) or self.end_layer < self.start_layer):
            bad(f"end_layer must be an integer >= start_layer ({self.start_layer}), got {self.end_layer!r}")
        if not isinstance(self.r, int) or self.r < 0:
            bad(f"r must be a non-negative integer, got {self.r!r}")
        if self.schedule is not None and (
            not isinstance(self.schedule, (list, tuple)) or any(not isinstance(x, int) or x < 0 for x in self.schedule)
        ):
            bad(f"schedule must be a list of non-negative integers, got {self.schedule!r}")
        if self.final_tokens is not None and (not isinstance(self.final_tokens, int) or self.final_tokens < 1):
            bad(f"final_tokens must be an integer >= 1, got {self.final_tokens!r}")
        if self.final_ratio is not None:
            fr = self.final_ratio
            if isinstance(fr, bool) or not isinstance(fr, (int, float)) or not 0.0 < float(fr) <= 1.0:
                bad(f"final_ratio must be a number in (0, 1], got {fr!r}")
            if self.final_tokens is not None or self.schedule is not None:
                other = "final_tokens" if self.final_tokens is not None else "schedule"
                bad(f"give either final_ratio or {other}, not both")
        for nm in ("beta", "gamma"):
            if not (0.0 <= float(getattr(self, nm)) <= 1.0):
                bad(f"{nm} must be in [0, 1], got {getattr(self, nm)!r}")
        if not (0.0 < float(self.epsilon) <= 1.0):
            bad(f"epsilon must be in (0, 1], got {self.epsilon!r}")
        if self.variant not in ("paper", "code"):
            bad(f"variant must be 'paper' or 'code', got {self.variant!r}")
        if self.positions not in ("keep", "renumber"):
            bad(f"positions must be 'keep' or 'renumber', got {self.positions!r}")

    def merge_layers(self, n_layers: int) -> list[int]:
        end = n_layers - 1 if self.end_layer is None else self.end_layer
        return list(range(self.start_layer, end + 1))

    def validate(self, adapter) -> None:
        super().validate(adapter)
        L = adapter.num_llm_layers
        self._n_layers = L
        if self._noop():
            return  # the documented no-op (nothing merged) is valid on any depth
        self.require_full_attention(adapter)
        LR.check_positions(self.positions, adapter, "ficoco_l")
        if self.start_layer >= L:
            raise MethodError(f"ficoco_l: start_layer={self.start_layer} must be < the number of LLM layers ({L})")
        if self.end_layer is not None and self.end_layer >= L:
            raise MethodError(f"ficoco_l: end_layer={self.end_layer} must be < the number of LLM layers ({L})")
        layers = self.merge_layers(L)
        if self.schedule is not None and len(self.schedule) != len(layers):
            raise MethodError(
                f"ficoco_l: schedule has {len(self.schedule)} entries for {len(layers)} merge layers "
                f"({layers[0]}..{layers[-1]})"
            )
        if adapter.family == "llava":
            nv = adapter.visual_tokens_per_image
            if self.final_tokens is not None and self.final_tokens > nv:
                raise MethodError(f"ficoco_l: final_tokens={self.final_tokens} exceeds the {nv} visual tokens per image")
            if self.schedule is not None and sum(self.schedule) >= nv:
                raise MethodError(f"ficoco_l: schedule removes {sum(self.schedule)} of {nv} visual tokens (must leave >= 1)")
        LR.check_layer_layout(adapter, layers)

    def _noop(self) -> bool:
        if self.final_ratio is not None:
            return float(self.final_ratio) >= 1.0  # round(1 * n) = n: nothing to remove
        if self.final_tokens is not None:
            return False
        return (sum(self.schedule) == 0) if self.schedule is not None else self.r == 0

    def apply(self, model, adapter):
        self.validate(adapter)
        if self._noop():
            return model
        LR.install(model, adapter, _FiCoCoLPlan(self, self.merge_layers(adapter.num_llm_layers)))
        return model

    def budget_token_params(self, value: float) -> dict:
        if float(value) > 1:
            return {"final_tokens": int(value), "final_ratio": None, "schedule": None}
        return {"final_tokens": None, "final_ratio": float(value), "schedule": None}

    def _sched(self, n_layers: int, visual: int, prompt_visual: int | None = None) -> dict[int, int]:
        """Tokens removed per merge layer for `visual` tokens entering the LLM (`prompt_visual`: the
        prompt's count before a vision-side stage, which a `final_ratio` is a share of)."""
        if not visual or self._noop():
            return {}
        ref = prompt_visual if (prompt_visual is not None and self._share_of_prompt) else visual
        final = final_count(ref, self.final_tokens, self.final_ratio)
        return merge_schedule(visual, self.merge_layers(n_layers), self.r, self.schedule, final)

    def visual_tokens_kept(self, layout, prompt_visual: int | None = None) -> int:
        n_layers = getattr(self, "_n_layers", None)
        if n_layers is None:
            raise MethodError("ficoco_l: call validate(adapter) first (the schedule depends on the model depth)")
        return layout.visual - sum(self._sched(n_layers, layout.visual, prompt_visual).values())

    # ---- FLOPs --------------------------------------------------------------------------------------
    def analytic_prefill_macs(self, shapes, layout, prompt_visual: int | None = None) -> dict[str, int]:
        """Batch-1 prefill: dense layers before start_layer; at a merge layer with n tokens, v visual,
        M text tokens after the first visual one (in-between text of several images included) and r
        removed: attention over n, MLP over n - r, plus the scores (paper: (v+M) query rows, each row
        block against the keys up to its last row, `score_key_macs`; code: (v+M) x (v+M)), the indirect
        term (paper r x M x (v-r); code r x M x v) and the compress matmul ((v-r) x r x d)."""
        macs = A.dense_prefill_macs(shapes, layout)
        s = shapes.llm
        sched = self._sched(s.layers, layout.visual, prompt_visual)
        if not any(sched.values()):
            return macs
        n, v, M, hw = layout.total, layout.visual, layout.between + layout.after, s.heads * s.head_dim
        llm = 0
        for layer in range(s.layers):
            r = sched.get(layer, 0)
            if r == 0:
                llm += A.llm_layer_macs(s, n)
                continue
            llm += A.llm_layer_macs(s, n_q=n, n_ffn=n - r)
            if self.variant == "paper":
                llm += score_key_macs(n - v - M, v, M, hw, layout.contiguous) + r * M * (v - r)
            else:
                llm += (v + M) * (v + M) * hw + r * M * v
            llm += (v - r) * r * s.hidden
            n, v = n - r, v - r
        macs["llm"] = llm
        return macs
