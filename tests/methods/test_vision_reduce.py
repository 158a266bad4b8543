"""Shared vision-encoder reduction machinery (methods/_shared/vision_reduce.py). The vision-side checks
the ToMe / FiCoCo-V / FiCoCo-VL tests reuse live in tests/methods/helpers.py."""
from __future__ import annotations

import pytest
import torch

import methods
from harness.efficiency.flops import layouts_from_inputs
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
from tests.methods.helpers import (
    NEXT_SIZES,
    assert_loglikelihood_equals_generation,
    check_batch_equals_single,
    check_flops,
    check_recomputed,
    inputs,
    llm_visual_tokens,
)
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


# ---- LLaVA-NeXT: a fixed per-crop count can pack an image into more tokens than the processor's ---------
def test_shrink_placeholders_grows_runs():
    """A reduced count above the full one inserts placeholders after the image's last one; samples that
    grow and samples that shrink are re-left-padded together; grown ids are recognised as reduced."""
    I, P = 9, 0
    ids = torch.tensor([[P, 1, I, I, 5], [1, I, I, I, 5]])
    am = (ids != P).long()
    new, mask, changed = shrink_placeholders(ids, am, [2, 3], [4, 1], I, P)
    assert changed
    assert new.tolist() == [[1, I, I, I, I, 5], [P, P, P, 1, I, 5]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    again, _, changed2 = shrink_placeholders(new, mask, [2, 3], [4, 1], I, P)
    assert not changed2 and again is new
    # equal totals (one image grows by what another loses): the runs tell full from reduced ids
    ids = torch.tensor([[1, I, I, 5, I, I, I, 6]])
    new, mask, changed = shrink_placeholders(ids, None, [2, 3], [3, 2], I, P)
    assert changed and mask is None
    assert new.tolist() == [[1, I, I, I, 5, I, I, 6]]
    again, _, changed2 = shrink_placeholders(new, None, [2, 3], [3, 2], I, P)
    assert not changed2 and again is new
    # no values (meta): the sequence gets longer by the added count per sample
    meta = torch.empty(2, 10, dtype=torch.long, device="meta")
    new, mask, changed = shrink_placeholders(meta, torch.empty_like(meta), [4, 4], [7, 7], I, P)
    assert changed and new.shape == (2, 13) and mask.shape == (2, 13)


#: fixed (not per-prompt) budgets on LLaVA-NeXT, tiny CLIP of 4 layers (64 visual tokens per crop, layers
#: 0..2 reduce), and how many of the 5 `NEXT_SIZES` they pack into more visual tokens (crops * k + 1, no
#: unpadding) than the processor inserted (unpadded grid + row newlines: 136 for 64x64, 172 for 96x64);
#: those samples failed before placeholder runs could grow
NEXT_FIXED = [
    ("tome", {"r": 1}, 2),  # k = 61: 3 crops -> 184 tokens
    ("tome", {"r": 4}, 1),  # k = 52: 157
    ("tome", {"r": 8}, 0),  # k = 40: 121, a cut for every size
    ("tome", {"tokens": 60}, 2),  # 181
    ("ficoco_v", {"start_layer": 0, "r": 2}, 2),  # k = 58: 175
]
NEXT_FIXED_IDS = ["tome-r1", "tome-r4", "tome-r8", "tome-tokens60", "ficoco_v-r2"]


def _next_applied(name, params):
    model, proc = build_tiny("llava_next", "llama", vision_layers=4)
    m = methods.build(name, params)
    m.apply(model, get_adapter(model))
    return model, proc, m


@pytest.mark.parametrize("name, params, grown", NEXT_FIXED, ids=NEXT_FIXED_IDS)
def test_next_fixed_budget_every_image_size(name, params, grown):
    """Each image size: the LLM gets crops * k + 1 visual tokens (= `visual_tokens_kept(layout)`),
    `generate` runs and returns the caller's ids; counted FLOPs == analytic where the run grows."""
    model, proc, m = _next_applied(name, params)
    k = get_adapter(model).visual_tokens_per_image - m.removed_per_crop()
    n_grown = 0
    for hw in NEXT_SIZES:
        inp = inputs(proc, [[hw]])
        layout = layouts_from_inputs(model, inp)[0]
        expected = inp["pixel_values"].shape[1] * k + 1
        assert m.visual_tokens_kept(layout) == expected
        assert llm_visual_tokens(model, inp) == expected
        T = inp["input_ids"].shape[1]
        out = model.generate(**inp, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, T + 2) and torch.equal(out[:, :T], inp["input_ids"])
        if expected > layout.visual:  # (cuts: the per-method FLOPs tests)
            n_grown += 1
            check_flops(model, m, inp)
    assert n_grown == grown


@pytest.mark.parametrize("name, params, grown", NEXT_FIXED, ids=NEXT_FIXED_IDS)
def test_next_fixed_budget_decode_and_batch(name, params, grown):
    """Cached == uncached recomputation (batch 1 and a batch of two same-shape prompts); a left-padded
    batch of samples that grow and samples that shrink, and one of same-size images, == batch 1; the
    lmms-eval wrapper's log-likelihood == generation's log-probs."""
    from tests.efficiency.helpers import image

    model, proc, _ = _next_applied(name, params)
    check_recomputed(model, inputs(proc, [[(64, 64)]]))
    check_recomputed(model, inputs(proc, [[(64, 64)], [(64, 64)]]))
    check_batch_equals_single(model, proc, "llava_next")
    check_batch_equals_single(model, proc, "llava_next", idx=(0, 3))
    assert_loglikelihood_equals_generation(model, proc, [image(3, (64, 64))])


def test_next_ficoco_vl_fixed_vision_tokens():
    """FiCoCo-VL's vision stage with a fixed count per crop (56: 3 crops -> 169 > 136 for 64x64) feeds
    its LLM stage: generation runs for every image size; counted FLOPs == analytic for 64x64."""
    model, proc, m = _next_applied(
        "ficoco_vl", {"vision_params": {"start_layer": 0}, "llm_params": {"start_layer": 1}, "tokens": 16,
                      "vision_tokens": 56},
    )
    for hw in NEXT_SIZES:
        inp = inputs(proc, [[hw]])
        T = inp["input_ids"].shape[1]
        out = model.generate(**inp, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, T + 2)
    check_flops(model, m, inputs(proc, [[(64, 64)]]))
