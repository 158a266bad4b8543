"""ShortV: no-op identity, fast path == simulation reference (logits, decode, KV cache), cached ==
uncached greedy decoding (batch 1 and left-padded batch 4), counted FLOPs == analytic, the paper's
TFLOPs tables, parameter errors, shipped layer lists."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import methods
from harness.models.adapter import get_adapter
from methods.base import MethodError
from methods._shared.context import install_context
from methods._shared.reduced_layer import patch_simulation
from tests.methods.helpers import check_uncached, forward, generate, llm_layout, make_inputs, sizes_of, tiny
from tests.artefacts import shortv_artefact, write_sealed

ROOT = Path(__file__).resolve().parents[2]


def simulation_model(model, layers):
    ad = get_adapter(model)
    ctx = install_context(model, ad)
    for i in layers:
        patch_simulation(ad.llm_layers[i], ctx, lambda c: c.visual_mask)
    return model


# ---- equivalence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_noop_identical(family):
    model, proc = tiny(family)
    inputs = make_inputs(proc, (0, 1), sizes_of(family))
    ref = forward(model, inputs).logits
    for params in ({"layers": []}, {"layers": [0, 2], "N": 0}):
        m = copy.deepcopy(model)
        methods.build("shortv", params).apply(m, get_adapter(m))
        assert torch.equal(forward(m, inputs).logits, ref)


@pytest.mark.slow
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava", "qwen2", True),
                                           ("llava_next", "mistral", True)])
def test_fast_equals_simulation(family, lm, gqa):
    layers = [3, 0, 1]
    model, proc = tiny(family, lm, gqa)
    sim = simulation_model(copy.deepcopy(model), layers)
    methods.build("shortv", {"layers": layers}).apply(model, get_adapter(model))
    for idx in ((0,), (0, 1, 2, 3)):
        inputs = make_inputs(proc, idx, sizes_of(family))
        a = forward(model, inputs, use_cache=True)
        b = forward(sim, inputs, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        real = inputs["attention_mask"].bool()
        for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
            for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        # the first frozen layer sees the dense input: its cache is bitwise identical
        assert torch.equal(a.past_key_values.layers[0].keys, b.past_key_values.layers[0].keys)
        sa, la_, _ = generate(model, inputs, 12)
        sb, lb_, _ = generate(sim, inputs, 12)
        assert torch.equal(sa, sb)
        torch.testing.assert_close(la_, lb_, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava", "mistral", True),
                                           ("llava", "qwen2", True), ("llava_next", "llama", False),
                                           ("llava_next", "qwen2", True)])
def test_cached_equals_uncached_and_batch(family, lm, gqa):
    model, proc = tiny(family, lm, gqa)
    methods.build("shortv", {"layers": [3, 1, 0]}).apply(model, get_adapter(model))
    steps = 6
    batch = make_inputs(proc, (0, 1, 2, 3), sizes_of(family))
    seqs, logits, _ = generate(model, batch, steps)
    check_uncached(model, batch, seqs, logits)
    P = batch["input_ids"].shape[1]
    for b in range(4):
        single = make_inputs(proc, (b,), sizes_of(family))
        s1, l1, _ = generate(model, single, steps)
        if b == 0:
            check_uncached(model, single, s1, l1)
        assert torch.equal(s1[0, -steps:], seqs[b, P:])
        torch.testing.assert_close(l1[0], logits[b], atol=1e-4, rtol=1e-4)


def test_text_only_prompt_unchanged():
    model, proc = tiny()
    inputs = proc(text=["USER: What is shown? ASSISTANT:", "USER: Which letter is written in the square? ASSISTANT:"],
                  return_tensors="pt", padding=True)
    ref = forward(model, inputs).logits
    methods.build("shortv", {"layers": [0, 1, 2, 3]}).apply(model, get_adapter(model))
    assert torch.equal(forward(model, inputs).logits, ref)


def test_decode_runs_original_layers():
    """Decode steps call the stock forward: a one-token step gives the dense model's logits."""
    model, proc = tiny()
    dense = copy.deepcopy(model)
    methods.build("shortv", {"layers": [1, 2]}).apply(model, get_adapter(model))
    inputs = make_inputs(proc)
    out = forward(model, inputs, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
    a = forward(model, {"input_ids": nxt, "attention_mask": mask}, past_key_values=copy.deepcopy(out.past_key_values))
    b = forward(dense, {"input_ids": nxt, "attention_mask": mask}, past_key_values=copy.deepcopy(out.past_key_values))
    assert torch.equal(a.logits, b.logits)


# ---- FLOPs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counter", ["flop_counter_mode", "fvcore"])
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava_next", "qwen2", True)])
def test_counted_flops_equal_analytic(counter, family, lm, gqa):
    from harness.efficiency.analytic import ModelShapes
    from harness.efficiency.flops import count_prefill

    model, proc = tiny(family, lm, gqa)
    inputs = make_inputs(proc, (1,), sizes_of(family))
    method = methods.build("shortv", {"layers": [3, 0, 2]})
    method.apply(model, get_adapter(model))
    counted = count_prefill(model, dict(inputs), counter=counter)
    layout = llm_layout(model, inputs)
    assert layout.visual > 0 and layout.text > 0
    analytic = method.analytic_prefill_macs(ModelShapes.from_config(model.config), layout)
    assert counted.flops["llm"] == 2 * analytic["llm"]
    assert analytic["llm"] < methods.build("none").analytic_prefill_macs(ModelShapes.from_config(model.config), layout)["llm"]


# ---- the paper's FLOPs tables (spec A7/A8) -------------------------------------------------------------
def _config(name):
    from omegaconf import OmegaConf

    from harness.models.loading import config_from_cfg

    return config_from_cfg(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))


# (model, N, TFLOPs, ratio %) as printed in Tables 1-2 (and Table 1's two-decimals in the text: 8.50/4.69 ...)
TABLES = [
    ("llava15_7b", 0, 8.5, 100), ("llava15_7b", 8, 6.9, 81), ("llava15_7b", 16, 5.3, 62),
    ("llava15_7b", 19, 4.7, 55), ("llava15_7b", 24, 3.7, 44),
    ("llava15_13b", 0, 16.6, 100), ("llava15_13b", 8, 14.1, 85), ("llava15_13b", 16, 11.6, 70),
    ("llava15_13b", 24, 9.1, 55), ("llava15_13b", 32, 6.6, 40),
    ("llava_next_7b", 0, 42.7, 100), ("llava_next_7b", 8, 33.8, 79), ("llava_next_7b", 16, 24.9, 58),
    ("llava_next_7b", 19, 21.6, 51), ("llava_next_7b", 24, 16.0, 37),
    ("llava_next_13b", 0, 81.8, 100), ("llava_next_13b", 8, 68.2, 83), ("llava_next_13b", 16, 54.6, 67),
    ("llava_next_13b", 24, 41.0, 50), ("llava_next_13b", 32, 27.5, 34),
]


def test_paper_tflops_tables():
    from methods.shortv import shortv_paper_tflops

    cfgs = {}
    for name, N, tf, ratio in TABLES:
        cfg = cfgs.setdefault(name, _config(name))
        r = shortv_paper_tflops(cfg, N)
        assert r["shortv_printed"] == tf and r["ratio_printed"] == ratio, (name, N, r)
        assert abs(r["shortv"] - tf) < 0.06 and abs(100 * r["ratio"] - ratio) < 1.0
    # two-decimal values quoted in the spec (A7)
    for name, N, dense, short in [("llava15_7b", 19, 8.50, 4.69), ("llava15_13b", 24, 16.58, 9.07),
                                  ("llava_next_7b", 19, 42.67, 21.56), ("llava_next_13b", 24, 81.81, 41.04)]:
        r = shortv_paper_tflops(cfgs[name], N)
        assert (round(r["dense"], 2), round(r["shortv"], 2)) == (dense, short)


# ---- parameters and configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("params,msg", [
    ({"layers": [1, -1]}, "negative"),
    ({"layers": [1, 1]}, "duplicated"),
    ({"layers": [1, 2], "N": 3}, "exceeds"),
    ({"layers": "some"}, "'auto'"),
    ({"layers": "auto"}, "needs N"),
    ({"layers": [0], "N": -1}, "non-negative"),
    ({"layers": [0.5]}, "integer"),
    ({"K": 2}, "no parameter"),
])
def test_bad_params(params, msg):
    with pytest.raises(MethodError, match=msg) as e:
        methods.build("shortv", params)
    assert "\n" not in str(e.value)


def test_validate_against_model(tmp_path):
    model, _ = tiny()
    ad = get_adapter(model)
    with pytest.raises(MethodError, match="out of range"):
        methods.build("shortv", {"layers": [0, 4]}).validate(ad)
    with pytest.raises(MethodError, match="not found"):
        methods.build("shortv", {"layers": "auto", "N": 2, "calibration": str(tmp_path / "nope.json")}).validate(ad)
    art = tmp_path / "lc.json"
    write_sealed(art, shortv_artefact([0.1, 0.3, 0.2, 0.0]))  # ranking [3, 0, 2, 1]
    with pytest.raises(MethodError, match="exceeds"):
        methods.build("shortv", {"layers": "auto", "N": 5, "calibration": str(art)}).validate(ad)
    # 'auto' without an artefact validates (vtbench calibrates first) but cannot be applied as it is
    pending = methods.build("shortv", {"layers": "auto", "N": 2})
    pending.validate(ad)
    with pytest.raises(MethodError, match="Layer Contribution artefact"):
        pending.apply(model, ad)
    m = methods.build("shortv", {"layers": "auto", "N": 2, "calibration": str(art)})
    m.validate(ad)
    assert m.frozen_layers(4) == [3, 0]
    write_sealed(art, shortv_artefact([0.0, 0.0]))  # a 2-layer model's
    with pytest.raises(MethodError, match="calibration=.*invalid calibration artefact: ranking is not a permutation of the 4"):
        m.validate(ad)


SHIPPED = {
    "llava15_7b": [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19],
    "llava15_13b": [39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17],
    "llava_next_7b": [31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2],
    "llava_next_13b": [39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34, 24, 38, 21, 20, 18, 1, 17],
}


@pytest.mark.parametrize("model_name", sorted(SHIPPED))
def test_shipped_layer_lists(model_name):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model_method" / f"{model_name}_shortv.yaml")
    params = OmegaConf.to_container(cfg.params)
    assert params["layers"] == SHIPPED[model_name]
    m = methods.build("shortv", params)
    assert m.num_frozen() == len(SHIPPED[model_name])
    L = _config(model_name).text_config.num_hidden_layers
    assert max(m.frozen_layers()) < L


def test_method_yaml_builds():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "method" / "shortv.yaml")
    m = methods.build(cfg.name, OmegaConf.to_container(cfg.params))
    assert m.num_frozen() == 0
