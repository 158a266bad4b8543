"""A reduced decoder layer: queries, attention, W_O and FFN for a *subset* of tokens, K/V for all.

Used by the layer-wise methods (ShortV, RedundancyLens; spec `layer_methods.md` Part C). During a
prefill, a patched layer computes

* RMSNorm and K/V projections (with RoPE) for **all** tokens, written to the KV cache exactly as the
  dense layer would (so decode steps and later text tokens see every visual K/V);
* per *query group* (a ragged per-sample set of token positions): Q projection with RoPE at the
  tokens' original positions, SDPA over all keys (or over a gathered key subset) with an explicit
  boolean mask = causal-in-sequence AND padding AND an optional group-specific pattern (e.g. Hollow
  Attention's local visual window), then W_O; rows in no query group get no attention update;
* per *FFN group*: post-attention RMSNorm and the MLP, optionally restricted to a per-sample subset
  of FFN channels chosen by a callback (Probe-Activated Dynamic FFN); rows in no FFN group skip the FFN.

Everything is gathered into dense `[B, n_max, ...]` tensors (ragged per-sample counts are padded to the
batch maximum and masked), computed, and scattered back, so the skipped work really is skipped (the
FLOPs counter sees only the reduced matrix products). Decode steps (and any call without a visual mask)
run the layer's original `forward` unchanged.

Layer structure relied on (Llama, Mistral and Qwen2 decoder layers in transformers 5.23 share it):
`input_layernorm`, `self_attn.{q,k,v,o}_proj` (Qwen2: q/k/v biases), `self_attn.{head_dim, scaling,
num_key_value_groups, layer_idx}`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, `mlp.act_fn`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from methods._shared.llm_reduce import take

_ORIGINAL = "_vtbench_original_forward"


# ---- plans -------------------------------------------------------------------------------------------
@dataclass
class QueryGroup:
    """Tokens whose queries are computed together.

    index/valid: `[B, n]` positions (padded slots: any position, `valid` False). key_index/key_valid:
    `[B, k]` positions of the keys this group may see (None = all T tokens). allow: optional extra
    `[B, n, k]` boolean pattern, AND-ed with causality and padding.
    """

    index: torch.Tensor
    valid: torch.Tensor
    key_index: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    allow: torch.Tensor | None = None


#: `select(z, valid) -> [B, K]` channel ids, from the post-attention-norm rows `z` [B, n, D] of the group
ChannelSelector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FFNGroup:
    """Tokens that go through the FFN together; `select_channels` (None = full width) picks a
    per-sample FFN channel subset from the group's normalised rows."""

    index: torch.Tensor
    valid: torch.Tensor
    select_channels: ChannelSelector | None = None


@dataclass
class LayerPlan:
    queries: list[QueryGroup] = field(default_factory=list)
    ffn: list[FFNGroup] = field(default_factory=list)


# ---- ragged index helpers --------------------------------------------------------------------------
def ragged_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of `mask` [B, T], in order, padded to the batch maximum.

    Returns `(index [B, n], valid [B, n])`; padded slots point at some position of the same sample
    and are marked invalid.
    """
    B, T = mask.shape
    counts = mask.sum(dim=1)
    n = int(counts.max()) if B else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    index = order[:, :n]
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return index, valid


def _scatter_rows(buf: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> None:
    """buf [B, T+1, D] (last row = sink for invalid slots): buf[b, index[b, i]] = rows[b, i] where valid."""
    sink = buf.shape[1] - 1
    idx = torch.where(valid, index, torch.full_like(index, sink))
    buf.scatter_(1, idx[..., None].expand_as(rows), rows)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, hd]; cos/sin [B, n, hd] (same arithmetic as the transformers Llama family)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    B, H, T, hd = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, hd).reshape(B, H * n_rep, T, hd)


def base_allow(
    attention_mask: torch.Tensor | None, padding_mask: torch.Tensor | None, B: int, T: int, device
) -> torch.Tensor:
    """Boolean [B, T, T] "query may attend key" for a prefill with an empty cache.

    Uses the layer's own 4-D mask when the model built one (bool for SDPA; additive float for eager;
    it also carries sliding windows), otherwise causal in sequence order AND the 2-D padding mask.
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] == T:
        m = attention_mask[:, 0, -T:, :]
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2
        return m.expand(B, T, T)
    pos = torch.arange(T, device=device)
    allow = (pos[None, :] <= pos[:, None])[None].expand(B, T, T)
    if padding_mask is not None:
        allow = allow & padding_mask[:, None, -T:].bool()
    return allow


# ---- the reduced forward -----------------------------------------------------------------------------
def reduced_layer_forward(
    layer,
    hidden_states: torch.Tensor,
    plan: LayerPlan,
    *,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    allow: torch.Tensor,
    past_key_values=None,
) -> torch.Tensor:
    """One prefill step of decoder `layer` under `plan`; returns the new hidden states [B, T, D].

    `allow` [B, T, T] is the base attention pattern (see `base_allow`).
    """
    attn = layer.self_attn
    B, T, D = hidden_states.shape
    hd = attn.head_dim
    n_rep = attn.num_key_value_groups
    cos, sin = position_embeddings
    cos = cos.expand(B, -1, -1)
    sin = sin.expand(B, -1, -1)

    x = layer.input_layernorm(hidden_states)
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    k = _rope(k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, attn.layer_idx)
    Tk = k.shape[2]

    delta = hidden_states.new_zeros(B, T + 1, D)
    for g in plan.queries:
        n = g.index.shape[1]
        if n == 0:
            continue
        xq = take(x, g.index)
        q = attn.q_proj(xq).view(B, n, -1, hd).transpose(1, 2)
        q = _rope(q, take(cos, g.index), take(sin, g.index))
        rows = take(allow, g.index)  # [B, n, T]
        if g.key_index is not None:
            kidx = g.key_index
            kk, vv, m = take(k, kidx, 2), take(v, kidx, 2), take(rows, kidx, 2)
            if g.key_valid is not None:
                m = m & g.key_valid[:, None, :]
        else:
            kk, vv, m = k, v, rows
            if Tk != T:  # pragma: no cover - prefill always starts from an empty cache here
                raise RuntimeError("reduced layer: prefill with a non-empty cache is not supported")
        if g.allow is not None:
            m = m & g.allow
        m = m & g.valid[:, :, None]
        out = F.scaled_dot_product_attention(
            q, _repeat_kv(kk, n_rep), _repeat_kv(vv, n_rep), attn_mask=m[:, None], scale=attn.scaling
        )
        out = attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))
        _scatter_rows(delta, g.index, g.valid, out)
    h1 = hidden_states + delta[:, :T]

    y = torch.cat([h1, h1.new_zeros(B, 1, D)], dim=1)
    mlp = layer.mlp
    for f in plan.ffn:
        n = f.index.shape[1]
        if n == 0:
            continue
        hr = take(h1, f.index)
        z = layer.post_attention_layernorm(hr)
        if f.select_channels is None:
            out = mlp(z)
        else:
            out = channel_subset_mlp(mlp, z, f.select_channels(z, f.valid))
        _scatter_rows(y, f.index, f.valid, hr + out)
    return y[:, :T]


def channel_subset_mlp(mlp, z: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP restricted to per-sample channels: `down[:, S](act(gate[S] z) * up[S] z)`.

    z [B, n, D], channels [B, K] -> [B, n, D]; the gathered weights are multiplied with `bmm`, so
    only K of the intermediate channels are computed.
    """
    Wg = mlp.gate_proj.weight[channels]  # [B, K, D]
    Wu = mlp.up_proj.weight[channels]
    Wd = mlp.down_proj.weight.t()[channels]  # [B, K, D]
    g = torch.bmm(z, Wg.transpose(1, 2))
    u = torch.bmm(z, Wu.transpose(1, 2))
    if mlp.gate_proj.bias is not None:
        g = g + mlp.gate_proj.bias[channels][:, None, :]
    if mlp.up_proj.bias is not None:
        u = u + mlp.up_proj.bias[channels][:, None, :]
    out = torch.bmm(mlp.act_fn(g) * u, Wd)
    if mlp.down_proj.bias is not None:
        out = out + mlp.down_proj.bias
    return out


# ---- patching -----------------------------------------------------------------------------------------
#: `plan_fn(ctx, layer_idx, hidden_states) -> LayerPlan | None` (None = run the dense layer)
PlanFn = Callable[..., "LayerPlan | None"]


def check_layer_structure(layer) -> str | None:
    """None if `layer` has the structure the reduced layer needs, else a short reason."""
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    need = [
        (layer, "input_layernorm"),
        (layer, "post_attention_layernorm"),
        (attn, "q_proj"),
        (attn, "k_proj"),
        (attn, "v_proj"),
        (attn, "o_proj"),
        (attn, "head_dim"),
        (attn, "scaling"),
        (attn, "num_key_value_groups"),
        (mlp, "gate_proj"),
        (mlp, "up_proj"),
        (mlp, "down_proj"),
        (mlp, "act_fn"),
    ]
    for obj, name in need:
        if obj is None or not hasattr(obj, name):
            return f"decoder layer {type(layer).__name__} has no {name!r}"
    return None


def patch_layer(layer, layer_idx: int, ctx, plan_fn: PlanFn) -> None:
    """Replace `layer.forward` (this instance only) with a prefill-reducing forward.

    During a prefill with a visual mask, `plan_fn` builds the plan and the reduced forward runs;
    otherwise (decode steps, text-only calls, plan None) the original forward runs unchanged.
    Patching twice replaces the plan, never stacks wrappers.
    """
    original = getattr(layer, _ORIGINAL, None) or layer.forward

    @functools.wraps(original)
    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        vm = ctx.visual_mask
        plan = None
        if (
            ctx.is_prefill
            and vm is not None
            and vm.shape[1] == hidden_states.shape[1]
            and hidden_states.shape[1] > 1
            and position_embeddings is not None
        ):
            plan = plan_fn(ctx, layer_idx, hidden_states)
        if plan is None:
            return original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
        B, T = hidden_states.shape[:2]
        cached = ctx.scratch.get("_reduced_allow")  # (the layer mask object, its [B, T, T] pattern)
        if cached is not None and cached[0] is attention_mask and cached[1].shape == (B, T, T):
            allow = cached[1]
        else:
            allow = base_allow(attention_mask, ctx.attention_mask, B, T, hidden_states.device)
            ctx.scratch["_reduced_allow"] = (attention_mask, allow)
        return reduced_layer_forward(
            layer, hidden_states, plan, position_embeddings=position_embeddings, allow=allow,
            past_key_values=past_key_values,
        )

    object.__setattr__(layer, _ORIGINAL, original)
    layer.forward = forward


def unpatch_layer(layer) -> None:
    """Restore the original forward of a layer patched by `patch_layer` / `patch_simulation`."""
    original = getattr(layer, _ORIGINAL, None)
    if original is not None:
        layer.forward = original
        object.__delattr__(layer, _ORIGINAL)


def patch_simulation(layer, ctx, rows_fn: Callable[..., torch.Tensor | None]) -> None:
    """Reference ("simulation") mode: run the dense layer, then reset the rows selected by
    `rows_fn(ctx) -> [B, T] bool | None` to the layer input (prefill only). No compute is saved; used as
    the test oracle for frozen layers and by the Layer Contribution calibration."""
    original = getattr(layer, _ORIGINAL, None) or layer.forward

    @functools.wraps(original)
    def forward(hidden_states, *args, **kwargs):
        out = original(hidden_states, *args, **kwargs)
        vm = ctx.visual_mask
        if ctx.is_prefill and vm is not None and vm.shape[1] == hidden_states.shape[1]:
            rows = rows_fn(ctx)
            if rows is not None:
                out = torch.where(rows[..., None], hidden_states, out)
        return out

    object.__setattr__(layer, _ORIGINAL, original)
    layer.forward = forward
