"""ToMe in the CLIP tower (methods/tome.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import methods
from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared.vision_reduce import VisionState, last_vision_state
from methods.base import MethodError
from methods.tome import ToMeReducer
from tests.methods.helpers import (
    check_batch_equals_single,
    check_recomputed as check_decode_consistency,
    check_flops,
    check_meta_flops,
    llm_visual_tokens,
    vision_inputs as make_inputs,
)

# tiny CLIP: 4 layers, 8x8 patches (64 visual tokens + CLS); feature layer -2 -> layers 0..2 merge
VL = 4


def _build(family="llava", lm="llama", gqa=False):
    return build_tiny(family, lm, gqa=gqa, vision_layers=VL)


def _apply(model, **params):
    m = methods.build("tome", params)
    m.apply(model, get_adapter(model))
    return m


@pytest.mark.parametrize("params", [{"r": 0}, {"r": [0, 0, 0]}, {"tokens": 64}])
def test_noop_is_identical(params):
    model, proc = _build()
    inputs = make_inputs(proc, [0, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
    _apply(model, **params)
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref)


def test_budget_reaches_llm_and_schedule():
    model, proc = _build()
    m = _apply(model, tokens=20)
    assert m.schedule(m._geom) == {0: 14, 1: 15, 2: 15}
    assert m.visual_tokens_to_llm(64) == 20 and m.visual_tokens_to_llm(128) == 40
    inputs = make_inputs(proc, [1])
    assert llm_visual_tokens(model, inputs) == 20
    st = last_vision_state(model)
    assert st.tokens_in == {0: 65, 1: 51, 2: 36, 3: 21}
    assert torch.equal(st.size.sum(-1), torch.full((1,), 65.0))  # 21 tokens still stand for all 65
    assert int(st.pos[0, 0]) == 0  # CLS stays first


def test_constant_r_and_spatial_order():
    model, proc = _build()
    m = _apply(model, r=10, order="spatial")
    assert m.schedule(m._geom) == {0: 10, 1: 10, 2: 10}
    inputs = make_inputs(proc, [2])
    assert llm_visual_tokens(model, inputs) == 34
    pos = last_vision_state(model).pos[0]
    assert torch.equal(pos, pos.sort().values)


def test_merge_is_size_weighted():
    """Tokens 0(CLS) 1 2 3 4 5: a = {0, 2, 4}, b = {1, 3, 5}; token 2's key equals token 3's, so with r=1
    token 2 merges into 3 with sizes 1 and 3 -> x3 = (1*x2 + 3*x3) / 4, size 4."""
    torch.manual_seed(0)
    B, N, H, dh, D = 1, 6, 2, 4, 3
    k = torch.randn(B, H, N, dh)
    k[:, :, 2] = k[:, :, 3]
    x = torch.randn(B, N, D)
    st = VisionState(size=torch.tensor([[1.0, 1, 1, 3, 1, 1]]), pos=torch.arange(N)[None])
    out = ToMeReducer({0: 1}, prop_attn=True, order="tome").reduce(0, x, k, k, st, 1)
    # order: unmerged a (0, 4), then b (1, 3, 5)
    assert st.pos.tolist() == [[0, 4, 1, 2, 5]]
    assert st.size.tolist() == [[1.0, 1.0, 1.0, 4.0, 1.0]]
    assert torch.allclose(out[0, 3], (x[0, 2] + 3 * x[0, 3]) / 4)
    assert torch.allclose(out[0, :2], x[0, [0, 4]])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"r": -1}, "non-negative"),
        ({"r": [1, "a"]}, "non-negative"),
        ({"tokens": 0}, "positive"),
        ({"tokens": 10, "r": 2}, "either"),
        ({"order": "random"}, "order"),
        ({"foo": 1}, "no parameter"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build("tome", params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": 65}, "exceeds"),
        ({"r": 20}, "bipartite"),
        ({"r": [1, 1, 1, 1]}, "after the last layer"),
        ({"r": [1, 1, 1, 1, 1]}, "entries"),
    ],
)
def test_validate_errors(params, match):
    model, _ = _build()
    m = methods.build("tome", params)
    with pytest.raises(MethodError, match=match) as e:
        m.validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_flops_counted_equal_analytic(family):
    model, proc = _build(family, "qwen2", gqa=True)
    m = _apply(model, tokens=20)
    check_flops(model, m, make_inputs(proc, [1], family))


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, lm, gqa",
    [
        ("llava", "llama", False),
        ("llava", "mistral", True),
        ("llava", "qwen2", True),
        ("llava_next", "llama", False),
        ("llava_next", "mistral", True),
        ("llava_next", "qwen2", True),
    ],
)
def test_decode_consistency_and_batch(family, lm, gqa):
    model, proc = _build(family, lm, gqa)
    _apply(model, tokens=20)
    check_decode_consistency(model, make_inputs(proc, [1], family))
    check_batch_equals_single(model, proc, family)


@pytest.mark.slow
def test_full_size_meta_count_equals_analytic():
    check_meta_flops("tome", {"tokens": 192})


def test_front_loaded_schedule_for_shallow_towers():
    """A token budget too deep for an even split on a shallow tower moves merges to earlier layers,
    within the bipartite cap (at most ceil(n/2) - 1 merges of n tokens, CLS protected); a budget no
    schedule can reach still fails in one line."""
    from methods._shared.vision_reduce import split_evenly
    from methods.tome import front_load

    layers = [0, 1, 2]
    even = split_evenly(144 - 18, layers)
    sched = front_load(even, layers, 145)
    assert sum(sched.values()) == 126 and sched != even
    n = 145
    for layer in layers:
        assert sched[layer] <= (n + 1) // 2 - 1
        n -= sched[layer]
    assert n == 19  # 18 visual tokens + CLS
    # already feasible: unchanged (the CLIP-L/24-layer LLaVA-1.5 budgets)
    assert front_load(split_evenly(384, list(range(23))), list(range(23)), 577) == split_evenly(384, list(range(23)))


@pytest.mark.slow
def test_full_size_next_meta_fixed_r_counts_equal_analytic():
    """LLaVA-NeXT-7B on meta, r=4 (k = 576 - 23*4 = 484 per crop): a 480x640 image packs into 5*484 + 1 =
    2421 visual tokens, more than the processor's 2340 (the placeholder run grows); 672x672 (2928) is cut."""
    from omegaconf import OmegaConf

    from harness.efficiency import flops as F
    from harness.models.loading import config_from_cfg, meta_model

    root = Path(__file__).resolve().parents[2]
    config = config_from_cfg(OmegaConf.load(root / "conf/model/llava_next_7b.yaml"))
    meta = meta_model(config)
    m = _apply(meta, r=4)
    for hw, full in [((480, 640), 2340), ((672, 672), 2928)]:
        layout = F.synthetic_layout(config, image_hw=hw)
        assert (layout.visual, layout.images) == (full, 5)
        assert m.visual_tokens_kept(layout) == 2421
        counted = F.count_prefill(meta, F.synthetic_inputs(config, image_hw=hw))
        assert counted.flops == F.analytic_prefill(config, layout, m)
