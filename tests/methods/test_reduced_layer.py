"""The shared reduced decoder layer, tested at layer level against the stock layer: a full plan equals
the dense layer (Llama/Mistral/Qwen2, MHA/GQA, left padding), subsets/patterns/channel subsets equal
their masked references, K/V of all tokens reach the cache, decode runs the original forward."""
from __future__ import annotations

import pytest
import torch

from harness.models.tiny import build_tiny
from methods._shared.reduced_layer import (
    FFNGroup, LayerPlan, QueryGroup, base_allow, channel_subset_mlp, patch_layer, ragged_positions,
    reduced_layer_forward, unpatch_layer,
)


@pytest.fixture(scope="module", params=[("llama", False), ("mistral", True), ("qwen2", True)])
def lm(request):
    name, gqa = request.param
    model, _ = build_tiny("llava", name, gqa=gqa, num_layers=2)
    return model.model.language_model


def _setup(lm, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, lm.config.hidden_size, generator=g)
    pad = torch.ones(B, T, dtype=torch.long)
    pad[1 % B, :3] = 0  # left padding
    pad[2 % B, :1] = 0
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    cos, sin = lm.rotary_emb(h, pos)
    from transformers.masking_utils import create_causal_mask

    mask4 = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=pad, past_key_values=None,
                               position_ids=pos)
    return h, pad, (cos, sin), mask4


def _dense(layer, h, pe, mask4, cache=None):
    with torch.no_grad():
        return layer(h, attention_mask=mask4, position_embeddings=pe, past_key_values=cache, use_cache=cache is not None)


def test_ragged_positions():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = ragged_positions(mask)
    assert idx.shape == (3, 3)
    assert valid.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert idx[0].tolist() == [1, 2, 4] and idx[1, 0] == 0


def test_full_plan_equals_dense_layer(lm):
    from transformers import DynamicCache

    h, pad, pe, mask4 = _setup(lm)
    layer = lm.layers[1]
    B, T = pad.shape
    idx, valid = ragged_positions(torch.ones(B, T, dtype=torch.bool))
    plan = LayerPlan([QueryGroup(idx, valid)], [FFNGroup(idx, valid)])
    c1, c2 = DynamicCache(config=lm.config), DynamicCache(config=lm.config)
    ref = _dense(layer, h, pe, mask4, c1)
    with torch.no_grad():
        out = reduced_layer_forward(layer, h, plan, position_embeddings=pe,
                                    allow=base_allow(mask4, pad, B, T, h.device), past_key_values=c2)
    real = pad.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(c1.layers[1].keys, c2.layers[1].keys)
    assert torch.equal(c1.layers[1].values, c2.layers[1].values)
    # the mask built from the 2-D padding mask equals the model's own 4-D mask on real rows
    own = base_allow(None, pad, B, T, h.device)
    hf = base_allow(mask4, pad, B, T, h.device)
    assert torch.equal(own[real], hf[real])


def test_subset_equals_masked_reference(lm):
    """Queries/FFN for a ragged subset only; other rows pass through; subset rows equal the dense layer."""
    h, pad, pe, mask4 = _setup(lm, seed=1)
    layer = lm.layers[0]
    B, T = pad.shape
    sub = torch.zeros(B, T, dtype=torch.bool)
    sub[0, [2, 5, 9, 10]] = True
    sub[1, [4, 10]] = True
    sub[2, 1:] = True
    idx, valid = ragged_positions(sub)
    plan = LayerPlan([QueryGroup(idx, valid)], [FFNGroup(idx, valid)])
    ref = _dense(layer, h, pe, mask4)
    with torch.no_grad():
        out = reduced_layer_forward(layer, h, plan, position_embeddings=pe, allow=base_allow(mask4, pad, B, T, h.device))
    torch.testing.assert_close(out[sub], ref[sub], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~sub], h[~sub])


def test_key_subset_pattern_and_channels(lm):
    """A query group over gathered keys with an extra pattern == SDPA with the full masked pattern;
    channel-subset FFN == full FFN with the other channels zeroed."""
    h, pad, pe, mask4 = _setup(lm, B=2, T=9, seed=2)
    pad[:] = 1
    layer = lm.layers[1]
    B, T = pad.shape
    allow = base_allow(None, pad, B, T, h.device)
    q_idx = torch.tensor([[6, 7, 8], [5, 6, 8]])
    k_idx = torch.tensor([[0, 1, 5, 6, 7, 8], [0, 2, 3, 5, 6, 8]])
    extra = torch.rand(B, 3, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    extra[..., 0] = True
    g_sub = QueryGroup(q_idx, torch.ones_like(q_idx, dtype=torch.bool), k_idx, torch.ones_like(k_idx, dtype=torch.bool), extra)
    full_pattern = torch.zeros(B, 3, T, dtype=torch.bool)
    full_pattern.scatter_(2, k_idx[:, None, :].expand(B, 3, 6), extra)
    g_full = QueryGroup(q_idx, torch.ones_like(q_idx, dtype=torch.bool), allow=full_pattern)
    channels = torch.tensor([[0, 3, 7, 8, 100], [1, 2, 3, 50, 127]])
    ffn = FFNGroup(q_idx, torch.ones_like(q_idx, dtype=torch.bool), lambda z, v: channels)
    with torch.no_grad():
        a = reduced_layer_forward(layer, h, LayerPlan([g_sub], [ffn]), position_embeddings=pe, allow=allow)
        b = reduced_layer_forward(layer, h, LayerPlan([g_full], [ffn]), position_embeddings=pe, allow=allow)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        mlp = layer.mlp
        z = torch.randn(B, 4, lm.config.hidden_size)
        keep = torch.zeros(B, mlp.gate_proj.out_features)
        keep.scatter_(1, channels, 1.0)
        ref = mlp.down_proj(mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z) * keep[:, None, :])
        torch.testing.assert_close(channel_subset_mlp(mlp, z, channels), ref, atol=1e-5, rtol=1e-5)
        all_ch = torch.arange(mlp.gate_proj.out_features).expand(B, -1)
        torch.testing.assert_close(channel_subset_mlp(mlp, z, all_ch), mlp(z), atol=1e-5, rtol=1e-5)


def test_patch_prefill_only_and_unpatch(lm):
    from types import SimpleNamespace

    h, pad, pe, mask4 = _setup(lm, B=1, T=6)
    layer = lm.layers[0]
    calls = []

    def plan_fn(ctx, i, hs):
        calls.append(i)
        return None  # dense

    ctx = SimpleNamespace(visual_mask=torch.zeros(1, 6, dtype=torch.bool), is_prefill=False, scratch={}, attention_mask=None)
    original = layer.forward
    patch_layer(layer, 0, ctx, plan_fn)
    patch_layer(layer, 0, ctx, plan_fn)  # idempotent: no stacking
    ref = _dense(layer, h, pe, None)
    assert calls == []  # not a prefill: plan never asked
    ctx.is_prefill = True
    out = _dense(layer, h, pe, None)
    assert calls == [0] and torch.equal(out, ref)
    unpatch_layer(layer)
    assert layer.forward == original
