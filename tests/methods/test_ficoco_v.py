"""FiCoCo-V in the CLIP tower (methods/ficoco_v.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import methods
from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared.vision_reduce import VisionState, last_vision_state
from methods.base import MethodError
from methods.ficoco_v import FiCoCoV, FiCoCoVReducer, ficoco_paper_tflops
from tests.methods.helpers import (
    check_batch_equals_single,
    check_recomputed as check_decode_consistency,
    check_flops,
    check_meta_flops,
    llm_visual_tokens,
    vision_inputs as make_inputs,
)

# tiny CLIP: 4 layers, 8x8 patches; feature layer -2 -> layers start_layer..2 reduce
VL = 4
BASE = {"start_layer": 1}


def _build(family="llava", lm="llama", gqa=False):
    return build_tiny(family, lm, gqa=gqa, vision_layers=VL)


def _apply(model, **params):
    m = methods.build("ficoco_v", {**BASE, **params})
    m.apply(model, get_adapter(model))
    return m


def test_paper_tflops_labels():
    """FiCoCo's convention (LLM prefill only, 60 text tokens, LLaVA-1.5-7B): 8.5 / 3.3 / 2.4(2.5) / 1.6 T."""
    assert round(ficoco_paper_tflops(576), 2) == 8.45
    assert round(ficoco_paper_tflops(192), 1) == 3.3
    assert round(ficoco_paper_tflops(128), 1) == 2.5 and round(ficoco_paper_tflops(128), 2) == 2.45
    assert round(ficoco_paper_tflops(64), 1) == 1.6


@pytest.mark.parametrize("params", [{"r": 0}, {"tokens": 64}])
def test_noop_is_identical(params):
    model, proc = _build()
    inputs = make_inputs(proc, [0, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
    _apply(model, **params)
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "opts",
    [{}, {"scores": "logits", "normalize": True, "lam": 0.65, "correlate": "ref"}, {"local_penalty": False}],
)
def test_budget_reaches_llm(opts):
    model, proc = _build()
    m = _apply(model, tokens=20, **opts)
    assert m.schedule(m._geom) == {1: 22, 2: 22}
    assert m.visual_tokens_to_llm(64) == 20
    assert llm_visual_tokens(model, make_inputs(proc, [1])) == 20
    st = last_vision_state(model)
    assert st.tokens_in == {0: 65, 1: 65, 2: 43, 3: 21}
    assert torch.allclose(st.size.sum(-1), torch.full((1,), 65.0))  # compress conserves mass
    assert int(st.pos[0, 0]) == 0 and torch.equal(st.pos[0], st.pos[0].sort().values)  # CLS first, order kept


def test_r_per_layer():
    model, proc = _build()
    m = _apply(model, r=10)
    assert m.schedule(m._geom) == {1: 10, 2: 10}
    assert llm_visual_tokens(model, make_inputs(proc, [2])) == 44


def _reducer(**kw):
    return FiCoCoVReducer({0: 1}, FiCoCoV(**kw), grid=4)


def test_local_penalty_one_per_window():
    s = torch.arange(16.0)[None] - 8  # 4x4 grid, windows of 2x2: maxima at 5, 7, 13, 15
    pos = torch.arange(16)[None] + 1
    out = _reducer().local_penalty(s, pos)
    changed = (out != s).nonzero()[:, 1].tolist()
    assert changed == [5, 7, 13, 15]
    assert torch.equal(out[0, changed], 2 * s[0, changed])
    # after discards the windows keep their original-grid meaning (pos, not list index)
    keep = torch.tensor([[0, 2, 3, 8, 9, 12]])
    out = _reducer().local_penalty(s.gather(1, keep), pos.gather(1, keep))
    assert (out != s.gather(1, keep)).nonzero()[:, 1].tolist() == [0, 2, 5]


def test_compress_is_self_preserving():
    """One discarded token, each target gets (X_j + a X_i) / (1 + a): x_i = 0, x_j = 1 -> 1 / (1 + a) ≥ 1/2."""
    torch.manual_seed(0)
    B, H, N, dh, D = 1, 2, 17, 4, 3
    q, k = torch.randn(B, H, N, dh), torch.randn(B, H, N, dh)
    st = VisionState(pos=torch.arange(N)[None])
    red = _reducer(local_penalty=False, eps=0.5)
    A = red.attention(q, k)
    s = 0.35 * A[:, 1:, 1:].mean(-1) - 0.65 * A[:, 0, 1:]
    src = int(s.argmax()) + 1
    x = torch.ones(B, N, D)
    x[0, src] = 0
    out = red.reduce(0, x, q, k, st, 1)
    assert out.shape == (B, N - 1, D)
    assert src not in st.pos[0].tolist()
    vals = out[0, 1:, 0]
    assert (vals >= 0.5).all() and (vals < 1).sum() >= 1  # information went somewhere, self kept
    assert torch.allclose(st.size.sum(), torch.tensor(float(N)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"r": -1}, "non-negative"),
        ({"tokens": 0}, "positive"),
        ({"tokens": 10, "r": 2}, "either"),
        ({"lam": 1.5}, "lam"),
        ({"eps": 1.0}, "eps"),
        ({"scores": "x"}, "scores"),
        ({"correlate": "x"}, "correlate"),
        ({"window": 0}, "window"),
        ({"penalty_scale": 0}, "penalty_scale"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build("ficoco_v", params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": 20, "start_layer": 12}, "start_layer"),
        ({"tokens": 65, "start_layer": 1}, "exceeds"),
        ({"r": 40, "start_layer": 1}, "at least one"),
    ],
)
def test_validate_errors(params, match):
    model, _ = _build()
    m = methods.build("ficoco_v", params)
    with pytest.raises(MethodError, match=match) as e:
        m.validate(get_adapter(model))
    assert "\n" not in str(e.value)


REF = {"scores": "logits", "normalize": True, "lam": 0.65, "correlate": "ref"}


@pytest.mark.parametrize("family, opts", [("llava", {}), ("llava", REF), ("llava_next", {})])
def test_flops_counted_equal_analytic(family, opts):
    model, proc = _build(family, "qwen2", gqa=True)
    m = _apply(model, tokens=20, **opts)
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
    _apply(model, tokens=20, **(REF if lm == "mistral" else {}))
    check_decode_consistency(model, make_inputs(proc, [1], family))
    check_batch_equals_single(model, proc, family)


def test_paper_labels_through_method_formula():
    """The method's own analytic LLM term under the project's FiCoCo convention == the label function."""
    from omegaconf import OmegaConf

    from harness.efficiency import conventions as C
    from harness.models.loading import config_from_cfg

    root = Path(__file__).resolve().parents[2]
    cfg = config_from_cfg(OmegaConf.load(root / "conf/model/llava15_7b.yaml"))
    for tokens, label in [(192, 3.3), (128, 2.5), (64, 1.6)]:
        for name in ("ficoco_v", "tome"):
            f = C.ficoco_flops(cfg, method=methods.build(name, {"tokens": tokens})) / 1e12
            assert f == pytest.approx(ficoco_paper_tflops(tokens), rel=1e-12) and round(f, 1) == label


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llava15_7b", "llava_next_7b"])
def test_full_size_meta_count_equals_analytic(model):
    check_meta_flops("ficoco_v", {"tokens": 64}, model)
