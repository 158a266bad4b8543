"""Shared vision-encoder reduction machinery (methods/_shared/vision_reduce.py). The vision-side checks
the ToMe / FiCoCo-V / FiCoCo-VL tests reuse live in tests/methods/helpers.py."""
from __future__ import annotations

import pytest
import torch

from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared.vision_reduce import (
    VisionReducer,
    install_placeholder_shrink,
    last_vision_state,
    patch_vision_layers,
    shrink_placeholders,
    split_evenly,
)
from tests.methods.helpers import llm_visual_tokens
from tests.methods.helpers import vision_inputs as make_inputs


# ---- tests of the machinery ------------------------------------------------------------------------------
def test_split_evenly_matches_spec_budgets():
    layers = list(range(23))
    for tokens, expect in [(192, (7, 16, 16, 17)), (128, (12, 19, 11, 20)), (64, (17, 22, 6, 23))]:
        s = split_evenly(576 - tokens, layers)
        vals = [s[i] for i in layers]
        n_lo, lo, n_hi, hi = expect
        assert vals == [lo] * n_lo + [hi] * n_hi
        assert sum(vals) == 576 - tokens


def test_shrink_placeholders_equal_and_ragged():
    I, P = 9, 0
    ids = torch.tensor([[P, 1, I, I, I, I, 5], [1, 7, I, I, I, I, 5]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    new, mask, changed = shrink_placeholders(ids, am, [4, 4], [2, 2], I, P)
    assert changed
    assert new.tolist() == [[P, 1, I, I, 5], [1, 7, I, I, 5]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # already reduced: unchanged
    again, mask2, changed2 = shrink_placeholders(new, mask, [4, 4], [2, 2], I, P)
    assert not changed2 and again is new
    # different numbers of images per sample -> re-left-padded
    ids = torch.tensor([[1, I, I, I, 5, I, I, I, 6], [P, P, P, P, P, 1, I, I, I]])
    am = (ids != P).long()
    new, mask, _ = shrink_placeholders(ids, am, [3, 3, 3], [1, 1, 1], I, P)
    assert new.tolist() == [[1, I, 5, I, 6], [P, P, P, 1, I]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="placeholder"):
        shrink_placeholders(ids[:, :-1], am[:, :-1], [3, 3, 3], [1, 1, 1], I, P)


class _NoOp(VisionReducer):
    def reduce(self, layer, x, q, k, state, r):  # pragma: no cover - never called with r=0
        raise AssertionError


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_layers_are_exact(attn):
    """Every CLIP layer routed through the patched forward (r=0, prop-attn on) -> identical logits."""
    model, proc = build_tiny("llava", "llama", vision_layers=4, attn_implementation=attn)
    inputs = make_inputs(proc, [0, 1], "llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    red = _NoOp({})
    red.prop_attn = True
    patch_vision_layers(model, get_adapter(model), red, force_layers={0, 1, 2, 3})
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert last_vision_state(model).tokens_in == {0: 65, 1: 65, 2: 65, 3: 65}


class _DropLast(VisionReducer):
    """Drops the last r tokens (a trivial reducer to exercise the plumbing)."""

    def reduce(self, layer, x, q, k, state, r):
        state.pos = state.pos[:, :-r]
        return x[:, :-r]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_placeholder_shrink_and_generate_output(family):
    model, proc = build_tiny(family, "llama", vision_layers=4)
    adapter = get_adapter(model)
    patch_vision_layers(model, adapter, _DropLast({0: 10, 2: 20}))
    k = adapter.visual_tokens_per_image - 30
    install_placeholder_shrink(model, adapter, k)
    inputs = make_inputs(proc, [1], family)
    crops = inputs["pixel_values"].shape[1] if family == "llava_next" else 1
    expected = crops * k + (1 if family == "llava_next" else 0)
    assert llm_visual_tokens(model, inputs) == expected
    assert last_vision_state(model).tokens_in == {0: 65, 1: 55, 2: 55, 3: 35}
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    T = inputs["input_ids"].shape[1]
    assert out.shape == (1, T + 3) and torch.equal(out[:, :T], inputs["input_ids"])


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size s attends/is attended like s identical copies of it (ToMe's prop-attn)."""
    from methods._shared.vision_reduce import VisionState

    model, _ = build_tiny("llava", "llama", vision_layers=4)
    adapter = get_adapter(model)
    red = _NoOp({})
    red.prop_attn = True
    holder = patch_vision_layers(model, adapter, red, force_layers={1})
    layer = adapter.vision_layers[1]
    torch.manual_seed(0)
    x = torch.randn(1, 5, adapter.vision_config.hidden_size)
    dup = torch.cat([x[:, :3], x[:, 2:3], x[:, 2:3], x[:, 3:]], dim=1)  # token 2 three times
    with torch.no_grad():
        holder.state = VisionState(size=torch.tensor([[1.0, 1, 3, 1, 1]]), pos=torch.arange(5)[None])
        merged = layer(x, None)
        holder.state = VisionState(size=torch.ones(1, 7), pos=torch.arange(7)[None])
        copies = layer(dup, None)
    holder.state = None
    assert torch.allclose(merged, copies[:, [0, 1, 2, 5, 6]], atol=1e-5)


def test_positional_calls_are_shrunk_too():
    model, proc = build_tiny("llava", "llama", vision_layers=4)
    adapter = get_adapter(model)
    patch_vision_layers(model, adapter, _DropLast({1: 30}))
    install_placeholder_shrink(model, adapter, adapter.visual_tokens_per_image - 30)
    inputs = make_inputs(proc, [1])
    ids, pv, am = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        assert torch.equal(model(ids, pv, am).logits, model(**inputs).logits)
    g = model.generate(ids, pixel_values=pv, attention_mask=am, max_new_tokens=2, do_sample=False)
    assert torch.equal(g, model.generate(**inputs, max_new_tokens=2, do_sample=False))
