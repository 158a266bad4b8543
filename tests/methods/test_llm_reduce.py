"""Shared in-LLM token-reduction machinery (`methods._shared.llm_reduce`): slicing with every token kept
reproduces the model (SDPA and eager, left padding, generation); dropping in place equals the
"mask variant" (dropped tokens masked as keys, positions unchanged) computed independently; per-layer
cache lengths and the visual-token log; errors. (Helpers: tests/methods/helpers.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

from harness.models.adapter import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from tests.methods.helpers import check_decode_consistency, check_uncached, forward, generate, make_inputs, tiny


# ---- test plans -----------------------------------------------------------------------------------
class FixedDrop(LR.ReductionPlan):
    """Drops visual tokens whose ordinal % every == 0 at `layer` (every=None: keeps all, sliced)."""

    def __init__(self, layer, every=None, positions="keep"):
        self.first_layer, self.every, self.positions = layer, every, positions

    def dropped(self, visual):
        if self.every is None:
            return torch.zeros_like(visual)
        ordinal = visual.long().cumsum(1) - 1
        return visual & (ordinal % self.every == 0)

    def before_layer(self, view):
        if view.layer != self.first_layer:
            return None
        drop = self.dropped(view.visual)
        B, n = drop.shape
        return torch.arange(n).expand(B, n)[~drop].view(B, -1)


def install_plan(model, plan):
    return LR.install(model, get_adapter(model), plan)


def mask_variant(model, layer, drop):
    """Reference: layers >= `layer` see `drop` [B, P] tokens masked as keys (positions unchanged)."""
    am = None

    def wrap(orig):
        def fwd(hidden_states, **kw):
            P = hidden_states.shape[1]
            if P == drop.shape[1]:
                valid = am.bool() if am is not None else torch.ones_like(drop)
                causal = torch.ones(P, P, dtype=torch.bool).tril()
                allowed = causal[None, None] & (valid & ~drop)[:, None, None, :]
                kw["attention_mask"] = allowed
            return orig(hidden_states, **kw)
        return fwd

    for lyr in get_adapter(model).llm_layers[layer:]:
        lyr.forward = wrap(lyr.forward)

    def set_mask(m):
        nonlocal am
        am = m
    return set_mask


# ---- tests -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_slicing_everything_kept_reproduces_model(attn, positions):
    base, proc = tiny("llava", "llama", gqa=True, attn=attn)
    model = copy.deepcopy(base)
    install_plan(model, FixedDrop(layer=1, every=None, positions=positions))
    inp = make_inputs(proc, (0, 1, 2, 3))
    ref = forward(base, inp).logits
    got = forward(model, inp).logits
    valid = inp["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    s_ref, l_ref, _ = generate(base, inp, 3)
    s_got, l_got, _ = generate(model, inp, 3)
    assert torch.equal(s_ref, s_got)
    torch.testing.assert_close(l_got, l_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm,gqa", [("llama", False), ("qwen2", True)])
def test_drop_in_place_equals_mask_variant(lm, gqa):
    """Kept tokens only ever see kept tokens with identical positions, so the last-token logits of the
    in-place drop equal those of masking the dropped tokens as keys in the full sequence."""
    base, proc = tiny("llava", lm, gqa=gqa)
    inp = make_inputs(proc, (0, 1, 2, 3))
    plan = FixedDrop(layer=2, every=3)
    model = copy.deepcopy(base)
    install_plan(model, plan)
    got = forward(model, inp).logits[:, -1]

    ref_model = copy.deepcopy(base)
    drop = plan.dropped(inp["input_ids"] == base.config.image_token_id)
    set_mask = mask_variant(ref_model, 2, drop)
    set_mask(inp["attention_mask"])
    ref = forward(ref_model, inp).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, forward(base, inp).logits[:, -1], atol=1e-4)


def test_cache_lengths_and_visual_log():
    model, proc = tiny("llava", "mistral", gqa=True)
    install_plan(model, FixedDrop(layer=2, every=2))
    inp = make_inputs(proc, (0, 1))
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    nv = int((inp["input_ids"][0] == model.config.image_token_id).sum())
    assert get_context(model).visual_tokens_per_layer == [nv, nv, nv // 2, nv // 2]
    lengths = [out.past_key_values.get_seq_length(i) for i in range(4)]
    assert lengths == [P, P, P - nv // 2, P - nv // 2]


@pytest.mark.slow
def test_decode_consistency_renumbered_positions():
    model, proc = tiny("llava", "llama")
    install_plan(model, FixedDrop(layer=1, every=2, positions="renumber"))
    check_decode_consistency(model, proc, steps=2)


def test_unequal_visual_counts_raise():
    model, proc = tiny("llava_next", "llama")
    install_plan(model, FixedDrop(layer=1, every=2))
    inp = make_inputs(proc, (0, 1), size={0: (64, 64), 1: (128, 64)})
    with pytest.raises(MethodError, match="different numbers of visual tokens"):
        forward(model, inp)


def test_install_twice_raises():
    model, _ = tiny("llava", "llama")
    install_plan(model, FixedDrop(layer=1))
    with pytest.raises(MethodError, match="already applied"):
        install_plan(model, FixedDrop(layer=1))
