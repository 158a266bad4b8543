"""ShortV: no-op identity, fast path == simulation reference (logits, decode, KV cache), cached ==
uncached greedy decoding (batch 1 and left-padded batch 4), counted FLOPs == analytic, the paper's
TFLOPs tables, parameter errors, shipped layer lists."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import methods
from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods.base import MethodError
from methods._shared.context import install_context
from methods._shared.reduced_layer import patch_simulation

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is shown?", "How many circles are there in the image?", "Which letter?", "Is there a red square left of the blue star?"]
SIZES = [(64, 64), (128, 64), (64, 128), (96, 80)]


@pytest.fixture(scope="module")
def tiny_cache():
    return {}


def tiny(cache, family="llava", lm="llama", gqa=False, num_layers=4):
    key = (family, lm, gqa, num_layers)
    if key not in cache:
        cache[key] = build_tiny(family, lm, gqa=gqa, num_layers=num_layers)
    model, proc = cache[key]
    return copy.deepcopy(model), proc


def make_inputs(proc, idx=(0,), family="llava"):
    imgs, texts = [], []
    for i in idx:
        w, h = SIZES[i] if family == "llava_next" else (64, 64)
        rs = np.random.RandomState(i)
        imgs.append(Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")))
        texts.append(proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}],
            add_generation_prompt=True))
    if len(idx) == 1:
        return proc(images=imgs[0], text=texts[0], return_tensors="pt")
    return proc(images=imgs, text=texts, return_tensors="pt", padding=True)


def generate(model, inputs, steps):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1), out.past_key_values


def llm_layout(model, inputs):
    """TokenLayout of a batch-1 prompt with one contiguous visual span (LLM side only)."""
    from harness.efficiency.analytic import TokenLayout

    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    T = inputs["input_ids"].shape[1]
    assert len(vis) and int(vis[-1] - vis[0]) + 1 == len(vis)
    return TokenLayout(before=int(vis[0]), visual=len(vis), after=T - int(vis[-1]) - 1)


def forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def check_uncached(model, inputs, seqs, logits):
    """Each greedy step recomputed without cache (full forward on prompt + generated prefix)."""
    P = inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for j in range(logits.shape[1]):
        ids = seqs[:, : P + j]
        mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], j, dtype=torch.long)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = forward(model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **extra},
                      use_cache=False).logits[:, -1]
        torch.testing.assert_close(out, logits[:, j], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.argmax(-1), seqs[:, P + j])


def simulation_model(model, layers):
    ad = get_adapter(model)
    ctx = install_context(model, ad)
    for i in layers:
        patch_simulation(ad.llm_layers[i], ctx, lambda c: c.visual_mask)
    return model


# ---- equivalence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_noop_identical(tiny_cache, family):
    model, proc = tiny(tiny_cache, family)
    inputs = make_inputs(proc, (0, 1), family)
    ref = forward(model, inputs).logits
    for params in ({"layers": []}, {"layers": [0, 2], "N": 0}):
        m = copy.deepcopy(model)
        methods.build("shortv", params).apply(m, get_adapter(m))
        assert torch.equal(forward(m, inputs).logits, ref)


@pytest.mark.slow
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava", "qwen2", True),
                                           ("llava_next", "mistral", True)])
def test_fast_equals_simulation(tiny_cache, family, lm, gqa):
    layers = [3, 0, 1]
    model, proc = tiny(tiny_cache, family, lm, gqa)
    sim = simulation_model(copy.deepcopy(model), layers)
    methods.build("shortv", {"layers": layers}).apply(model, get_adapter(model))
    for idx in ((0,), (0, 1, 2, 3)):
        inputs = make_inputs(proc, idx, family)
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
def test_cached_equals_uncached_and_batch(tiny_cache, family, lm, gqa):
    model, proc = tiny(tiny_cache, family, lm, gqa)
    methods.build("shortv", {"layers": [3, 1, 0]}).apply(model, get_adapter(model))
    steps = 6
    batch = make_inputs(proc, (0, 1, 2, 3), family)
    seqs, logits, _ = generate(model, batch, steps)
    check_uncached(model, batch, seqs, logits)
    P = batch["input_ids"].shape[1]
    for b in range(4):
        single = make_inputs(proc, (b,), family)
        s1, l1, _ = generate(model, single, steps)
        if b == 0:
            check_uncached(model, single, s1, l1)
        assert torch.equal(s1[0, -steps:], seqs[b, P:])
        torch.testing.assert_close(l1[0], logits[b], atol=1e-4, rtol=1e-4)


def test_text_only_prompt_unchanged(tiny_cache):
    model, proc = tiny(tiny_cache)
    inputs = proc(text=["USER: What is shown? ASSISTANT:", "USER: Which letter is written in the square? ASSISTANT:"],
                  return_tensors="pt", padding=True)
    ref = forward(model, inputs).logits
    methods.build("shortv", {"layers": [0, 1, 2, 3]}).apply(model, get_adapter(model))
    assert torch.equal(forward(model, inputs).logits, ref)


def test_decode_runs_original_layers(tiny_cache):
    """Decode steps call the stock forward: a one-token step gives the dense model's logits."""
    model, proc = tiny(tiny_cache)
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
def test_counted_flops_equal_analytic(tiny_cache, counter, family, lm, gqa):
    from harness.efficiency.analytic import ModelShapes
    from harness.efficiency.flops import count_prefill

    model, proc = tiny(tiny_cache, family, lm, gqa)
    inputs = make_inputs(proc, (1,), family)
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


def test_validate_against_model(tiny_cache, tmp_path):
    model, _ = tiny(tiny_cache)
    ad = get_adapter(model)
    with pytest.raises(MethodError, match="out of range"):
        methods.build("shortv", {"layers": [0, 4]}).validate(ad)
    with pytest.raises(MethodError, match="not found"):
        methods.build("shortv", {"layers": "auto", "N": 2, "calibration": str(tmp_path / "nope.json")}).validate(ad)
    art = tmp_path / "lc.json"
    art.write_text(json.dumps({"ranking": [3, 0, 2, 1], "scores": [0.1, 0.3, 0.2, 0.0]}))
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
    art.write_text(json.dumps({"ranking": [0, 1], "scores": [0, 0]}))
    with pytest.raises(MethodError, match="ranks 2 layers"):
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
