"""Between-layer token reduction inside the LLM decoder: the machinery FastV, `random`, FiCoCo-L and
FiCoCo-VL share.

How it acts on one model instance (no transformers source is touched):

* **Layer wrappers.** Every decoder layer from the first reducing layer on gets an instance-level
  `forward` wrapper. The model's layer loop is unchanged: it computes `position_embeddings` (cos, sin),
  position ids and the attention mask once, for the full sequence, and passes them to every layer. A
  wrapped layer slices them with the indices of the tokens still alive, which `ReduceState` keeps per
  sample as indices into the prefill sequence (so no offset is ever hard-coded, and left padding works).
* **Two reduction points.** A `ReductionPlan` may drop tokens at a layer's input (`before_layer`: FastV,
  `random`; it may also rewrite rows of the layer input before the drop, e.g. SparseVLM's recycled
  tokens written into their cluster centres' rows) and/or merge tokens between a layer's attention and
  its MLP (`after_attention`: FiCoCo-L). A multi-stage plan with `count_first_drop` has the context's
  `visual_tokens_final` record its first drop (the token budget's count), not the last.
  The second one runs the layer composed from its own submodules (pre-norm Llama/Mistral/Qwen2 layout).
* **Masks.** A layer running on a shortened sequence gets a mask built here from the per-sample 2-D
  padding mask (causal AND key valid; kept tokens stay in original order, so causality in the shortened
  sequence is causality in the original one), in the format of the attention implementation (bool for
  SDPA, additive float for eager), or `None` where SDPA's no-mask path is exact (no padding and
  q_len == 1 or q_len == kv_len), exactly as transformers decides it.
* **KV cache.** A shortened layer caches only its kept tokens (`DynamicCache` keeps per-layer tensors, so
  cache lengths differ per layer). In decode each shortened layer builds its mask from the validity of
  its own cached prefill tokens plus the decode tokens' columns of the 2-D mask `generate` grows.
* **Positions.** `"keep"` (FastV): kept tokens keep their RoPE positions (gaps allowed) and decode tokens
  continue at full-length positions. M-RoPE (Qwen2-VL) works the same way: the model turns its three
  position streams (temporal, height, width) into one cos/sin row per token before the layer loop, so
  slicing cos/sin with the kept indices keeps each kept token's three positions, in prefill, in the
  KV cache (keys are cached post-RoPE) and in decoding (decode positions come from the model's
  `rope_deltas`, i.e. full-length positions). `"renumber"` is refused on M-RoPE (one line). `"renumber"`: after a removal positions are contiguous per sample
  (each token's position minus the tokens removed before it); decode tokens are shifted by the number
  removed before the layer.
* **Scores.** `QKCapture` records a layer's q_proj / k_proj outputs with forward hooks (the layer's SDPA
  call is untouched); `post_rope` applies the model's own RoPE function; `query_row_probs` computes
  only the needed attention rows.

Batch > 1: every sample must lose the same number of tokens (equal per-sample budgets), so samples in a
batch need the same number of visual tokens; a clear error says so otherwise (the lmms-eval wrapper batches
prompts of one visual shape together, so evaluations never hit it).

Several images: the visual tokens may form several spans; plans read them from the mask, and FiCoCo-L's
text rows are the non-visual tokens after the prompt's first visual token (`visual_is_one_span` tells a
plan which case it is in). `continuation(model, n)` marks a call's last n tokens as not prompt
(log-likelihood scoring).

No-cache calls re-run the prefill path on the whole sequence. Methods whose selection depends on "the
last prompt token" read `score_row`, which `pin_prompt_length(model, n)` can fix to column n-1, so an
uncached forward over prompt+generated tokens reproduces the cached (prune-once-at-prefill) semantics.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from methods._shared.context import get_context, install_context, narrowed
from methods.base import MethodError

_ATTR = "_vtbench_llm_reducer"
SUPPORTED_ATTN = ("sdpa", "eager")


# ---- selection helpers ---------------------------------------------------------------------------
def equal_visual_count(visual: torch.Tensor, what: str = "reduction") -> int:
    """Number of visual tokens per sample; raise if samples differ (equal per-sample budgets)."""
    counts = visual.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise MethodError(
            f"{what}: samples in this batch have different numbers of visual tokens "
            f"({', '.join(str(int(c)) for c in counts)}); equal per-sample budgets need equal counts "
            "(use batch size 1 or images of the same size)"
        )
    return int(counts[0])


def prompt_visual_count(view, nv: int) -> int:
    """The prompt's visual-token count as the processor inserted it (what a budget share is of): the
    context's `prompt_visual` (set before a vision-side stage shortened the prompt), else `nv`, the
    count entering the LLM. Samples must agree (as for `nv`)."""
    pv = getattr(view.ctx, "prompt_visual", None)
    if pv is None or pv.numel() != view.state.visual.shape[0]:
        return nv
    if bool((pv != pv[0]).any()):
        raise MethodError(
            "samples in this batch had different numbers of visual tokens before the vision-side reduction "
            f"({', '.join(str(int(c)) for c in pv)}); batch prompts of the same shape"
        )
    return int(pv[0])


def visual_is_one_span(visual: torch.Tensor) -> bool:
    """True if every sample's visual tokens ([B, n] bool) are one contiguous span."""
    n = visual.shape[1]
    col = torch.arange(n, device=visual.device)
    first = torch.where(visual, col, n).min(1).values
    last = torch.where(visual, col, -1).max(1).values
    count = visual.sum(1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


def keep_top_visual(scores: torch.Tensor, visual: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [B, n - nv + keep] (ascending) keeping every non-visual token and the `keep` visual
    tokens with the highest score per sample. `scores`, `visual`: [B, n]."""
    n = visual.shape[1]
    nv = equal_visual_count(visual)
    s = scores.float().masked_fill(~visual, float("inf"))
    idx = torch.topk(s, n - nv + keep, dim=1, sorted=False).indices
    return torch.sort(idx, dim=1).values


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, n, d] -> [B, H_kv * n_rep, n, d] (GQA: each kv head serves n_rep query heads)."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=1)


def query_row_probs(
    q_rows: torch.Tensor, k: torch.Tensor, key_allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys.

    q_rows [B, H, r, d] (post-RoPE), k [B, H_kv, n, d] (post-RoPE), key_allowed [B, r, n] or [B, n]
    bool. Returns probabilities [B, H, r, n] (float32). Cost: B*H*r*n*d MACs (one matmul).
    """
    k = repeat_kv(k, q_rows.shape[1] // k.shape[1])
    # the scale goes on the few query rows, not on the [B, H, r, n] logits; the mask is added in place as
    # a 0 / -inf bias shared by the heads (on CPU a broadcast add is ~10x faster than a broadcast masked_fill)
    logits = torch.matmul(q_rows * scaling, k.transpose(-1, -2)).float()
    allowed = key_allowed[:, None, None, :] if key_allowed.dim() == 2 else key_allowed[:, None]
    bias = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~allowed, float("-inf"))
    logits.add_(bias)
    return torch.softmax(logits, dim=-1)


class QKCapture:
    """Records the q_proj / k_proj outputs of one attention module during prefill (forward hooks on the
    projections: the attention itself, SDPA included, runs unchanged)."""

    def __init__(self, attn, enabled):
        self.attn = attn
        self.enabled = enabled  # callable -> bool
        self.q = self.k = None
        self._handles = [
            attn.q_proj.register_forward_hook(self._hook("q")),
            attn.k_proj.register_forward_hook(self._hook("k")),
        ]

    def _hook(self, which):
        def hook(module, inputs, output):
            if self.enabled():
                setattr(self, which, output)

        return hook

    def take(self):
        q, k = self.q, self.k
        self.q = self.k = None
        return q, k

    def remove(self):
        for h in self._handles:
            h.remove()


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, n, H*d] -> [B, H, n, d]."""
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


def rope_function(attn):
    """The model's own `apply_rotary_pos_emb` (from the attention module's modeling file)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise MethodError(f"{type(attn).__name__}: no apply_rotary_pos_emb in its modeling module")
    return fn


def post_rope(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the model's RoPE to x [B, H, n, d] with cos/sin [B|1, n, d]."""
    return rope_function(attn)(x, x, cos, sin)[0]


# ---- state --------------------------------------------------------------------------------------
@dataclass
class ReduceState:
    """Per-model bookkeeping of one generation (reset at every prefill)."""

    n_layers: int
    P: int = 0  # prefill length (padded)
    valid: torch.Tensor | None = None  # [B, P] bool: real (non-padding) prefill tokens
    pos: torch.Tensor | None = None  # [B, P] long: prefill position ids
    visual: torch.Tensor | None = None  # [B, P] bool
    cur: torch.Tensor | None = None  # [B, n] indices of alive tokens (None: all P)
    removed_any: bool = False  # the sliced path is active (some layer got explicit indices)
    cache_idx: list = field(default_factory=list)  # per layer: prefill tokens cached ([B,n_l] | None)
    shift: list = field(default_factory=list)  # per layer: [B] tokens removed before decode tokens
    pinned_prompt: int | None = None
    pinned_suffix: int = 0  # the last columns of a call that are not prompt (log-likelihood continuation)
    contiguous: bool = True  # the prefill's visual tokens form one span in every sample (set by plans)
    #: merges of the current prefill, {layer: (discarded, targets, weights)}: visual ordinals among the visual
    #: tokens alive at that layer ([B, r], [B, v - r]) and the weights [B, r, v - r] each discarded token
    #: was merged into the targets with (a target then holds 1 / (1 + sum of its weights) of itself);
    #: bookkeeping only, read by harness.recall
    merges: dict = field(default_factory=dict)

    def reset(self, visual, attention_mask, position_ids, P, B, device):
        self.P = P
        self.visual = visual
        if attention_mask is not None and attention_mask.dim() == 2:
            self.valid = attention_mask[:, -P:].bool()
        else:
            self.valid = torch.ones(B, P, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = torch.arange(P, device=device)[None]
        self.pos = position_ids.expand(B, -1).long()
        self.cur = None
        self.contiguous = True
        self.removed_any = False
        self.cache_idx = [None] * self.n_layers
        self.shift = [None] * self.n_layers
        self.merges = {}

    def current(self) -> torch.Tensor:
        if self.cur is None:
            B = self.valid.shape[0]
            return torch.arange(self.P, device=self.valid.device)[None].expand(B, -1)
        return self.cur

    def removed_before(self, idx: torch.Tensor) -> torch.Tensor:
        """For tokens `idx` [B, n] (prefill indices): how many prefill tokens before each are removed."""
        cur = self.current()
        alive = torch.zeros(self.valid.shape, dtype=torch.long, device=cur.device).scatter(
            1, cur, torch.ones_like(cur)
        )
        removed = 1 - alive
        before = removed.cumsum(1) - removed
        return before.gather(1, idx)


@dataclass
class LayerView:
    """What a plan sees at one layer during prefill."""

    layer: int
    ctx: Any
    state: ReduceState
    hidden: torch.Tensor  # [B, n, d] current hidden states (layer input or after attention)
    position_embeddings: tuple  # (cos, sin) for the current tokens
    index: torch.Tensor  # [B, n] prefill indices of the current tokens

    @property
    def visual(self) -> torch.Tensor:
        return self.state.visual.gather(1, self.index)

    @property
    def valid(self) -> torch.Tensor:
        return self.state.valid.gather(1, self.index)

    @property
    def score_row(self) -> int:
        """Column (in the current sequence) of the query that scores: the last prompt token (the last
        token, or column n-1 of the pinned prompt length)."""
        if self.state.pinned_suffix:
            target = self.state.P - self.state.pinned_suffix - 1
        elif self.state.pinned_prompt is None:
            return self.hidden.shape[1] - 1
        else:
            target = self.state.pinned_prompt - 1
        hit = (self.index[0] == target).nonzero()
        if hit.numel() == 0:
            raise MethodError("pinned prompt end was removed; it must be a non-visual token")
        return int(hit[0, 0])


class ReductionPlan:
    """Hooks a method implements. Indices returned are into the current sequence, ascending, same
    count per sample."""

    first_layer: int = 0
    positions: str = "keep"  # or "renumber"
    #: True for a multi-stage method (PyramidDrop, SparseVLM) whose token budget is the count at its first
    #: drop (the context's `visual_tokens_final` then records that count, not the last stage's)
    count_first_drop: bool = False

    def score_layers(self) -> list[int]:
        """Layers whose q/k projections must be captured during prefill."""
        return []

    def before_layer(self, view: LayerView) -> torch.Tensor | tuple | None:
        """Keep indices [B, n'] (or None: keep all), or `(hidden [B, n, d], keep)` when the plan also
        changes rows of the layer input before the drop (a merged token written into a kept row)."""
        return None

    def merges_at(self, layer: int) -> bool:
        return False

    def after_attention(self, view: LayerView, qk) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(updated hidden [B, n, d], keep indices [B, n']) or None, for a layer where `merges_at` is
        True: the machinery then keeps rows `keep` of the updated hidden states for the MLP and the
        following layers. `qk`: the layer's captured (q_proj, k_proj) outputs."""
        return None


# ---- masks --------------------------------------------------------------------------------------
def build_mask(key_valid: torch.Tensor, q_len: int, impl: str, dtype) -> torch.Tensor | None:
    """4-D mask for q_len queries that are the last q_len of the keys: allowed[b, i, j] =
    key_valid[b, j] and j <= n_k - q_len + i. None when SDPA's no-mask path is exact."""
    B, n_k = key_valid.shape
    if impl == "sdpa" and (q_len == 1 or q_len == n_k) and bool(key_valid.all()):
        return None
    dev = key_valid.device
    i = torch.arange(q_len, device=dev)[:, None]
    j = torch.arange(n_k, device=dev)[None, :]
    allowed = (j <= n_k - q_len + i)[None, None] & key_valid[:, None, None, :]
    if impl == "eager":
        out = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        return out.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def take(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x [B|1, ...] gathered along `dim` with one index row per sample, idx [B, m]. At batch 1 this is
    `index_select` (the same values; on CPU much faster than `gather` with an expanded index)."""
    if idx.shape[0] == 1 and x.shape[0] == 1:
        return x.index_select(dim, idx[0])
    B = idx.shape[0]
    x = x.expand(B, *x.shape[1:])
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    view = [B] + [1] * (x.dim() - 1)
    view[dim] = idx.shape[1]
    return x.gather(dim, idx.reshape(view).expand(shape))


# ---- the reducer ----------------------------------------------------------------------------------
class LLMReducer:
    """Installs a `ReductionPlan` on one model instance."""

    def __init__(self, model, adapter, plan: ReductionPlan):
        self.model = model
        self.adapter = adapter
        self.plan = plan
        self.ctx = install_context(model, adapter)
        self.layers = adapter.llm_layers
        self.state = ReduceState(n_layers=len(self.layers))
        plan.reducer = self
        self.impl = adapter.text_config._attn_implementation or "eager"
        self.rotary = getattr(adapter.language_model, "rotary_emb", None)
        self.captures = {
            i: QKCapture(self.layers[i].self_attn, lambda: self.ctx.is_prefill) for i in plan.score_layers()
        }
        self._originals = {}
        for i in range(plan.first_layer, len(self.layers)):
            layer = self.layers[i]
            self._originals[i] = layer.forward
            layer.forward = self._wrap(i, layer, layer.forward)

    # -- prefill ------------------------------------------------------------------------------------
    def _positions(self, hidden, idx, cos_sin, position_ids):
        """(cos, sin) and position ids for tokens `idx` (prefill indices)."""
        st = self.state
        if self.plan.positions == "renumber" and st.removed_any:
            pos = st.pos.gather(1, idx) - st.removed_before(idx)
            return self.rotary(hidden, pos), pos
        cos, sin = cos_sin
        pos = st.pos.gather(1, idx)
        return (take(cos, idx), take(sin, idx)), pos

    def _prefill(self, i, layer, orig, hidden, kwargs):
        ctx, st, plan = self.ctx, self.state, self.plan
        if i == plan.first_layer:
            B, P = hidden.shape[:2]
            vm = ctx.visual_mask
            if vm is None or vm.shape != (B, P):
                raise MethodError("LLM token reduction needs input_ids (visual mask) for the prefill")
            st.reset(vm, ctx.attention_mask, kwargs.get("position_ids"), P, B, hidden.device)
            nv = equal_visual_count(vm)
            ctx.visual_tokens_per_layer = [nv] * len(self.layers)
        full_pe = kwargs["position_embeddings"]

        # 1) drop at the layer input
        keep = plan.before_layer(
            LayerView(i, ctx, st, hidden, self._cur_pe(hidden, full_pe, kwargs), st.current())
        )
        if isinstance(keep, tuple):  # (updated hidden, keep): rows changed before the drop (merged tokens)
            hidden, keep = keep
        if keep is not None:
            hidden = take(hidden, keep)
            st.cur = st.current().gather(1, keep)
            if not (plan.count_first_drop and st.removed_any):
                ctx.visual_tokens_final = int(st.visual.gather(1, st.cur).sum(1).max())
            st.removed_any = True
        if st.cur is not None:
            ctx.visual_tokens_per_layer[i] = int(st.visual.gather(1, st.cur)[0].sum())

        merging = plan.merges_at(i)
        if not st.removed_any and not merging:
            out = orig(hidden, **kwargs)  # nothing removed yet: untouched inputs
            self._release(i, merging)
            return out
        idx = st.current()
        kw = dict(kwargs)
        if st.removed_any:
            pe, pos = self._positions(hidden, idx, full_pe, kwargs.get("position_ids"))
            kw["position_embeddings"] = pe
            kw["position_ids"] = pos
            kw["attention_mask"] = build_mask(st.valid.gather(1, idx), idx.shape[1], self.impl, hidden.dtype)
            st.cache_idx[i] = idx
            if self.plan.positions == "renumber":
                st.shift[i] = torch.full((idx.shape[0],), st.P - idx.shape[1], device=idx.device)
        if not merging:
            if st.removed_any:  # a reduced layer inside (a composition's layer-wise member) sees the kept tokens
                with narrowed(ctx, idx):
                    out = orig(hidden, **kw)
            else:
                out = orig(hidden, **kw)
            self._release(i, merging)
            return out
        return self._merge_layer(i, layer, hidden, kw)

    def _release(self, i, merging):
        """Drop q/k captured at a wrapped layer that did not merge (captures of layers before the
        first wrapped one are read by a later layer's `before_layer`)."""
        if not merging and i in self.captures:
            self.captures[i].take()

    def _cur_pe(self, hidden, full_pe, kwargs):
        st = self.state
        if st.cur is None:
            return full_pe
        return self._positions(hidden, st.cur, full_pe, kwargs.get("position_ids"))[0]

    def _merge_layer(self, i, layer, hidden, kw):
        """A pre-norm decoder layer composed from its own modules, with a merge between the attention
        residual and the MLP."""
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn_kw = {k: v for k, v in kw.items() if k not in ("hidden_states",)}
        a, _ = layer.self_attn(hidden_states=x, **attn_kw)
        hidden = residual + a
        qk = self.captures[i].take() if i in self.captures else None
        st = self.state
        out = self.plan.after_attention(
            LayerView(i, self.ctx, st, hidden, kw["position_embeddings"], st.current()), qk
        )
        if out is not None:
            hidden, keep = out
            hidden = take(hidden, keep)
            st.cur = st.current().gather(1, keep)
            st.removed_any = True
            self.ctx.visual_tokens_final = int(st.visual.gather(1, st.cur).sum(1).max())
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    # -- decode -------------------------------------------------------------------------------------
    def _decode(self, i, orig, hidden, kwargs):
        st = self.state
        idx = st.cache_idx[i] if st.cache_idx else None
        if idx is None:
            return orig(hidden, **kwargs)
        B, q = hidden.shape[:2]
        kw = dict(kwargs)
        pkv = kwargs.get("past_key_values")
        cached = pkv.get_seq_length(i) if pkv is not None else 0
        n_new = cached + q - idx.shape[1]  # decode tokens in this layer's keys (incl. current)
        am = self.ctx.attention_mask
        if am is not None and am.dim() == 2:
            new_valid = am[:, -n_new:].bool()
        else:
            new_valid = torch.ones(B, n_new, dtype=torch.bool, device=hidden.device)
        key_valid = torch.cat([st.valid.gather(1, idx), new_valid], dim=1)
        kw["attention_mask"] = build_mask(key_valid, q, self.impl, hidden.dtype)
        if self.plan.positions == "renumber" and st.shift[i] is not None:
            pos = kwargs["position_ids"].expand(B, -1) - st.shift[i][:, None]
            kw["position_ids"] = pos
            kw["position_embeddings"] = self.rotary(hidden, pos)
        return orig(hidden, **kw)

    def _wrap(self, i, layer, orig):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise MethodError("LLM token reduction expects decoder layers to be called with keywords")
            if self.ctx.is_prefill:
                return self._prefill(i, layer, orig, hidden_states, kwargs)
            return self._decode(i, orig, hidden_states, kwargs)

        return forward

    def remove(self):
        for i, f in self._originals.items():
            self.layers[i].forward = f
        for c in self.captures.values():
            c.remove()


def check_positions(positions: str, adapter, who: str | None = None) -> None:
    """`positions="renumber"` needs 1-D RoPE: refused (one line) on a model with several position streams
    (M-RoPE). Called by each method's `validate` (so a sweep refuses the cell before any cell runs) and
    again by `install`."""
    if positions == "renumber" and getattr(adapter, "position_streams", 1) > 1:
        head = f"{who}: " if who else ""
        raise MethodError(
            f"{head}positions='renumber' is defined for 1-D RoPE; {adapter.family}'s M-RoPE places visual tokens on a "
            "(temporal, height, width) grid that a renumbering would distort: use positions='keep'"
        )


def install(model, adapter, plan: ReductionPlan) -> LLMReducer:
    """Install `plan` on `model` (once per instance)."""
    if getattr(model, _ATTR, None) is not None:
        raise MethodError("an LLM token-reduction method is already applied to this model instance")
    impl = adapter.text_config._attn_implementation or "eager"
    if impl not in SUPPORTED_ATTN:
        raise MethodError(
            f"LLM token reduction supports attention implementations {', '.join(SUPPORTED_ATTN)}, not {impl!r}"
        )
    check_positions(plan.positions, adapter)
    red = LLMReducer(model, adapter, plan)
    object.__setattr__(model, _ATTR, red)
    return red


def get_reducer(model) -> LLMReducer | None:
    return getattr(model, _ATTR, None)


def pin_prompt_length(model, n: int | None) -> None:
    """Make scoring use column n-1 as "the last prompt token" (None: the last token of each call).

    With it, an uncached forward over prompt + generated tokens selects exactly what the cached
    prefill selected (prune once at prefill), which is how cached and uncached decoding are compared.
    """
    red = get_reducer(model)
    if red is None:
        raise MethodError("no LLM token-reduction method is applied to this model")
    red.state.pinned_prompt = n


@contextlib.contextmanager
def continuation(model, n: int):
    """Within the block, every forward's last `n` tokens are a continuation, not prompt: a method that
    scores from the last prompt token uses the token before them (log-likelihood scoring of a
    continuation then selects what generation's prefill of the context selects). Works on a
    placeholder-shortened sequence too (counted from the end). No-op on a model without LLM reduction."""
    red = get_reducer(model)
    if red is None or n <= 0:
        yield
        return
    old = red.state.pinned_suffix
    red.state.pinned_suffix = int(n)
    try:
        yield
    finally:
        red.state.pinned_suffix = old


def check_layer_layout(adapter, layers) -> None:
    """Merging between attention and MLP needs the pre-norm Llama/Mistral/Qwen2 decoder layout."""
    for i in layers:
        layer = adapter.llm_layers[i]
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                raise MethodError(f"LLM layer {i} ({type(layer).__name__}) has no {name}: unsupported layout")
