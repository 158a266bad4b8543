"""The papers' printed vanilla FLOPs, reproduced by our conventions (tolerance: the printed digit)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.efficiency import conventions as C
from harness.models.loading import config_from_cfg


CONF = Path(__file__).resolve().parents[2] / "conf"


def cfg(name):
    return config_from_cfg(OmegaConf.load(CONF / "model" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def configs():
    return {n: cfg(n) for n in ("llava15_7b", "llava15_13b", "llava_next_7b", "llava_next_13b")}


def test_llava15_7b_llm_prefill_576_plus_64(configs):
    # env spec §4: counted on the meta device == analytic, 8.5040e12 FLOPs
    f = C.llm_prefill_flops(configs["llava15_7b"], 576, 64)
    assert f == 8_504_035_246_080
    assert round(f / 1e12, 3) == 8.504


@pytest.mark.parametrize(
    "model,ours,printed",
    [("llava15_7b", 8.50, 8.5), ("llava15_13b", 16.58, 16.6), ("llava_next_7b", 42.67, 42.7), ("llava_next_13b", 81.81, 81.8)],
)
def test_shortv_vanilla(configs, model, ours, printed):
    f = C.shortv_flops(configs[model]) / 1e12
    assert round(f, 2) == ours
    assert round(f, 1) == printed


def test_shortv_defaults(configs):
    assert C.paper_visual_tokens(configs["llava15_7b"]) == 576
    assert C.paper_visual_tokens(configs["llava_next_13b"]) == 2880
    assert C.shortv_flops(configs["llava15_7b"]) == C.shortv_flops(configs["llava15_7b"], 576, 64)


@pytest.mark.parametrize("visual,ours,printed", [(576, 8.45, (8.4, 8.5)), (192, 3.30, (3.3,)), (128, 2.45, (2.4, 2.5)), (64, 1.61, (1.6,))])
def test_ficoco_7b(configs, visual, ours, printed):
    c = configs["llava15_7b"]
    assert C.ficoco_text_tokens(c) == 60
    f = C.ficoco_flops(c, visual) / 1e12
    assert round(f, 2) == ours
    assert any(abs(f - p) <= 0.05 + 1e-9 for p in printed)


def test_ficoco_13b_and_next(configs):
    c13 = configs["llava15_13b"]
    assert C.ficoco_text_tokens(c13) == 512
    assert round(C.ficoco_flops(c13, 576) / 1e12, 1) == 28.6  # v1 / v4 appendix
    assert round(C.ficoco_flops(configs["llava_next_7b"], 2880) / 1e12, 1) == 42.6  # paper 42.7 (spec §0.5)


def test_fastv_table1_baselines(configs):
    f7 = C.fastv_flops(configs["llava15_7b"]) / 1e9
    f13 = C.fastv_flops(configs["llava15_13b"]) / 1e9
    assert C.fastv_n(configs["llava15_7b"]) == 611 and C.fastv_n(configs["llava15_13b"]) == 612
    assert round(f7, 1) == 99.2  # printed 99.3 (only n=612 gives it; the reduced 7B rows need n=611)
    assert abs(f7 - 99.3) <= 0.15
    assert round(f13, 1) == 154.6


@pytest.mark.parametrize(
    "model,K,R,printed",
    [("llava15_7b", 2, 0.5, 54.6), ("llava15_7b", 2, 0.75, 32.8), ("llava15_7b", 2, 0.9, 19.9),
     ("llava15_13b", 2, 0.5, 84.6), ("llava15_13b", 2, 0.75, 50.2), ("llava15_13b", 2, 0.9, 29.7)],
)
def test_fastv_table1_reduced(configs, model, K, R, printed):
    c = configs[model]
    f = C.fastv_flops(c, C.fastv_tokens_per_layer(c, K, R)) / 1e9
    assert round(f, 1) == printed


def test_fastv_formula_is_per_layer():
    from types import SimpleNamespace

    tc = SimpleNamespace(hidden_size=10, intermediate_size=20, num_hidden_layers=2)
    c = SimpleNamespace(text_config=tc)
    assert C.fastv_layer_macs(c, 3) == 4 * 3 * 100 + 2 * 9 * 10 + 2 * 3 * 10 * 20


def test_evaluate_all(configs):
    from harness.efficiency import flops as F

    c = configs["llava15_7b"]
    layout = F.synthetic_layout(c)
    for name in C.CONVENTIONS:
        r = C.evaluate(name, c, layout=layout)
        assert r["convention"] == name and r["total"] > 0 and r["description"]
    full = C.evaluate("full", c, layout=layout)
    assert full["flops"]["llm"] == C.shortv_flops(c)  # 1 + 576 + 63 = 640 tokens
    with pytest.raises(ValueError):
        C.evaluate("nope", c)


def test_method_enters_conventions(configs):
    import methods

    c = configs["llava15_7b"]
    m = methods.build("none", {})
    assert C.shortv_flops(c, method=m) == C.shortv_flops(c)
    assert C.ficoco_flops(c, method=m) == C.ficoco_flops(c)


def _method(name, params):
    import methods

    if name not in methods.available():
        pytest.skip(f"method {name} not available")
    return methods.build(name, params)


@pytest.mark.parametrize(
    "model,N,tflops,ratio",
    [("llava15_7b", 19, 4.7, 55), ("llava15_13b", 24, 9.1, 55), ("llava_next_7b", 19, 21.6, 51), ("llava_next_13b", 24, 41.0, 50)],
)
def test_shortv_table1_reduced(configs, model, N, tflops, ratio):
    """ShortV Table 1 through the method's own analytic formula under ShortV's convention."""
    c = configs[model]
    L = c.text_config.num_hidden_layers
    m = _method("shortv", {"layers": list(range(L - N, L))})
    f = C.shortv_flops(c, method=m)
    assert round(f / 1e12, 1) == tflops
    assert round(100 * f / C.shortv_flops(c)) == ratio


@pytest.mark.parametrize(
    "model,tflops", [("llava15_7b", 4.9), ("llava15_13b", 9.4), ("llava_next_7b", 22.0), ("llava_next_13b", 42.1)]
)
def test_fastv_in_shortv_convention(configs, model, tflops):
    m = _method("fastv", {"K": 2, "R": 0.5})
    assert round(C.shortv_flops(configs[model], method=m) / 1e12, 1) == tflops


def test_fastv_method_in_fastv_convention(configs):
    m = _method("fastv", {"K": 2, "R": 0.5})
    assert round(C.evaluate("fastv", configs["llava15_13b"], method=m)["total"] / 1e9, 1) == 84.6
