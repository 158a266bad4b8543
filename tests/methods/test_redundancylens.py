"""RedundancyLens: no-op identity, sparse fast path == masked/zeroed simulation reference, cached ==
uncached greedy decoding (batch 1 and left-padded batch 4, LLaVA and LLaVA-NeXT with ragged visual
counts), counted FLOPs == analytic, probes reproducible, greedy ranking on a model, parameter errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.artefacts import redundancylens_artefact, write_sealed
import methods
from harness.models.adapter import get_adapter
from methods.base import MethodError
from methods._shared.context import install_context
from methods.redundancylens import hollow_visual_pairs, kl_evaluator
from tests.methods.helpers import check_uncached, forward, generate, llm_layout, make_inputs, sizes_of, tiny

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"hollow_layers": [0, 2], "ffn_layers": [2, 3], "window": 12, "hollow_block": 8, "ffn_keep": 0.25}


def simulation_model(model, method):
    """Hollow layers run the stock forward with a 4-D hollow mask; FFN layers run the full MLP and zero the
    non-selected channels of visual rows (channels chosen from the full intermediate of the probes)."""
    ad = get_adapter(model)
    ctx = install_context(model, ad)
    hollow, ffn = method.resolved_layers(ad.num_llm_layers)

    def hollow_mask():
        vm = ctx.visual_mask
        B, T = vm.shape
        real = ctx.attention_mask.bool() if ctx.attention_mask is not None else torch.ones_like(vm)
        pos = torch.arange(T)
        rank = vm.long().cumsum(1) - 1
        allow = (pos[None, :] <= pos[:, None])[None] & real[:, None, :]
        both = vm[:, :, None] & vm[:, None, :]
        near = (rank[:, :, None] - rank[:, None, :]) < method.window
        return (allow & (~both | near))[:, None]

    for i in hollow:
        layer = ad.llm_layers[i]
        orig = layer.forward

        def fwd(hidden_states, *args, _orig=orig, **kw):
            if ctx.is_prefill and ctx.visual_mask is not None and hidden_states.shape[1] == ctx.visual_mask.shape[1]:
                kw["attention_mask"] = hollow_mask()
            return _orig(hidden_states, *args, **kw)

        layer.forward = fwd
    for i in ffn:
        mlp = ad.llm_layers[i].mlp

        def mlp_fwd(x, _mlp=mlp, _i=i):
            h = _mlp.act_fn(_mlp.gate_proj(x)) * _mlp.up_proj(x)
            vm = ctx.visual_mask
            if ctx.is_prefill and vm is not None and x.shape[1] == vm.shape[1]:
                K = method.ffn_channels(h.shape[-1])
                for b in range(x.shape[0]):
                    vis = vm[b].nonzero().squeeze(1)
                    if len(vis) == 0:
                        continue
                    probes = vis[method.probe_ranks(len(vis), _i)]
                    score = h[b, probes].abs().float().mean(0)
                    keep = torch.zeros(h.shape[-1], dtype=h.dtype)
                    keep[score.topk(K).indices] = 1
                    h[b, vis] = h[b, vis] * keep
            return _mlp.down_proj(h)

        mlp.forward = mlp_fwd
    return model


# ---- equivalence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_noop_identical(family):
    model, proc = tiny(family)
    inputs = make_inputs(proc, (0, 1), sizes_of(family))
    ref = forward(model, inputs).logits
    for params in ({}, {"hollow_layers": [0, 1, 2, 3], "ffn_layers": [1, 3], "window": 100000, "ffn_keep": 1.0}):
        m = copy.deepcopy(model)
        methods.build("redundancylens", params).apply(m, get_adapter(m))
        assert torch.equal(forward(m, inputs).logits, ref)


@pytest.mark.slow
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava_next", "qwen2", True)])
def test_fast_equals_simulation(family, lm, gqa):
    model, proc = tiny(family, lm, gqa)
    method = methods.build("redundancylens", PARAMS)
    sim = simulation_model(copy.deepcopy(model), method)
    method.apply(model, get_adapter(model))
    dense = forward(copy.deepcopy(tiny(family, lm, gqa)[0]), make_inputs(proc, (1,), sizes_of(family))).logits
    for idx in ((1,), (0, 1, 2, 3)):
        inputs = make_inputs(proc, idx, sizes_of(family))
        a = forward(model, inputs, use_cache=True)
        b = forward(sim, inputs, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        real = inputs["attention_mask"].bool()
        for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
            torch.testing.assert_close(la.keys.transpose(1, 2)[real], lb.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        sa, la_, _ = generate(model, inputs, 8)
        sb, lb_, _ = generate(sim, inputs, 8)
        assert torch.equal(sa, sb)
        torch.testing.assert_close(la_, lb_, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(forward(model, make_inputs(proc, (1,), sizes_of(family))).logits, dense)  # it does reduce


@pytest.mark.slow
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava", "mistral", True),
                                           ("llava", "qwen2", True), ("llava_next", "llama", False),
                                           ("llava_next", "mistral", True)])
def test_cached_equals_uncached_and_batch(family, lm, gqa):
    model, proc = tiny(family, lm, gqa)
    methods.build("redundancylens", PARAMS).apply(model, get_adapter(model))
    steps = 5
    batch = make_inputs(proc, (0, 1, 2, 3), sizes_of(family))
    seqs, logits, _ = generate(model, batch, steps)
    check_uncached(model, batch, seqs, logits)
    P = batch["input_ids"].shape[1]
    for b in range(4):
        single = make_inputs(proc, (b,), sizes_of(family))
        s1, l1, _ = generate(model, single, steps)
        if b == 1:
            check_uncached(model, single, s1, l1)
        assert torch.equal(s1[0, -steps:], seqs[b, P:])
        torch.testing.assert_close(l1[0], logits[b], atol=1e-4, rtol=1e-4)


# ---- FLOPs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counter,family,lm,gqa", [
    ("flop_counter_mode", "llava", "llama", False), ("fvcore", "llava", "llama", False),
    ("flop_counter_mode", "llava_next", "qwen2", True),
    pytest.param("fvcore", "llava_next", "qwen2", True, marks=pytest.mark.slow),
])
def test_counted_flops_equal_analytic(counter, family, lm, gqa):
    from harness.efficiency.analytic import ModelShapes
    from harness.efficiency.flops import count_prefill

    model, proc = tiny(family, lm, gqa)
    inputs = make_inputs(proc, (1,), sizes_of(family))
    method = methods.build("redundancylens", PARAMS)
    method.apply(model, get_adapter(model))
    counted = count_prefill(model, dict(inputs), counter=counter)
    layout = llm_layout(model, inputs)
    shapes = ModelShapes.from_config(model.config)
    analytic = method.analytic_prefill_macs(shapes, layout)
    assert counted.flops["llm"] == 2 * analytic["llm"]
    assert analytic["llm"] < methods.build("none").analytic_prefill_macs(shapes, layout)["llm"]


# spec B8.5 [CALC] (t=64 after the image, R_A=256, keep 0.2, M=N/10, reductions on the last L/2 layers):
# Hollow+FFN, FFN only, Hollow only, as % of dense LLM prefill. Our count differs by <= 0.15 points (the
# spec charges v*R_A visual pairs and a fractional M; we count the computed blocks and M = ceil(N/10)).
B85 = {"llava15_7b": (576, 77.9, 78.5, 99.4), "llava15_13b": (576, 77.9, 78.3, 99.5),
       "llava_next_7b": (2880, 73.9, 78.6, 95.4), "llava_next_13b": (2880, 74.3, 78.1, 96.2)}


@pytest.mark.parametrize("name", sorted(B85))
def test_operating_points_match_spec(name):
    from omegaconf import OmegaConf

    from harness.efficiency.analytic import ModelShapes, TokenLayout, llm_prefill_macs
    from harness.models.loading import config_from_cfg

    shapes = ModelShapes.from_config(config_from_cfg(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")))
    v, *expected = B85[name]
    layout = TokenLayout(before=0, visual=v, after=64)
    dense = llm_prefill_macs(shapes.llm, layout.total)
    half = list(range(shapes.llm.layers // 2, shapes.llm.layers))
    for params, pct in zip(({"hollow_layers": half, "ffn_layers": half}, {"ffn_layers": half}, {"hollow_layers": half}), expected):
        got = 100 * methods.build("redundancylens", params).analytic_prefill_macs(shapes, layout)["llm"] / dense
        assert abs(got - pct) <= 0.15, (params, got, pct)


def test_hollow_pairs():
    # block = 1 scores exactly the hollow band: each visual rank r sees p + min(r + 1, W) keys
    for v, p, W in ((10, 3, 4), (7, 0, 100), (33, 5, 8)):
        exact = sum(p + min(r + 1, W) for r in range(v))
        assert hollow_visual_pairs(v, p, W, 1) == exact
        assert hollow_visual_pairs(v, p, W, 8) >= exact


def test_probes_reproducible_and_batch_invariant():
    m = methods.build("redundancylens", {**PARAMS, "probe_ratio": 0.3})
    assert torch.equal(m.probe_ranks(50, 2), m.probe_ranks(50, 2))
    assert len(m.probe_ranks(50, 2)) == 15 and not torch.equal(m.probe_ranks(50, 2), m.probe_ranks(50, 3))
    assert methods.build("redundancylens", {"probe_sampling": "strided", "probe_ratio": 0.1}).probe_ranks(50, 0).tolist() == [5, 15, 25, 35, 45]
    model, proc = tiny("llava_next")
    m.apply(model, get_adapter(model))
    ctx = install_context(model, get_adapter(model))
    forward(model, make_inputs(proc, (0, 1, 2), sizes_of("llava_next")))
    batch_ch = ctx.scratch["redundancylens_channels_3"]
    forward(model, make_inputs(proc, (2,), sizes_of("llava_next")))
    assert torch.equal(ctx.scratch["redundancylens_channels_3"][0], batch_ch[2])
    assert batch_ch.shape[1] == m.ffn_channels(model.config.text_config.intermediate_size) == 32


@pytest.mark.slow
def test_greedy_ranking_with_kl_evaluator(tmp_path):
    from methods._shared.calibration import greedy_layer_ranking

    model, proc = tiny()
    ad = get_adapter(model)
    batches = [dict(make_inputs(proc, (0, 1))), dict(make_inputs(proc, (2,)))]
    ref = forward(model, batches[1]).logits
    evaluate = kl_evaluator(model, ad, batches, "ffn", ffn_keep=0.25)
    assert evaluate([]) == {"agreement": 1.0}
    out = greedy_layer_ranking(4, evaluate, tail=1)
    assert out["ranking"][0] == 3 and sorted(out["ranking"]) == [0, 1, 2, 3]
    assert torch.equal(forward(model, batches[1]).logits, ref)  # unpatched afterwards
    art = tmp_path / "rank.json"
    write_sealed(art, dict(redundancylens_artefact(out["ranking"], tail=1, rounds=out["rounds"]), base=out["base"]))
    m = methods.build("redundancylens", {"ffn_layers": "auto", "ffn_ratio": 0.5, "calibration_ffn": str(art)})
    m.validate(ad)
    assert m.resolved_layers(4) == ([], out["ranking"][:2])
    # 'auto' without an artefact validates (vtbench calibrates first) but cannot be applied as it is
    pending = methods.build("redundancylens", {"ffn_layers": "auto"})
    pending.validate(ad)
    with pytest.raises(MethodError, match="layer-ranking artefact"):
        pending.apply(model, ad)


# ---- parameters ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,msg", [
    ({"hollow_layers": [0, -2]}, "negative"),
    ({"ffn_layers": [1, 1]}, "duplicated"),
    ({"ffn_layers": "some"}, "'auto'"),
    ({"ffn_keep": 0.0}, "out of range"),
    ({"ffn_keep": 1.5}, "out of range"),
    ({"hollow_ratio": -0.1}, "out of range"),
    ({"probe_ratio": 2}, "out of range"),
    ({"window": 0}, "positive integer"),
    ({"hollow_block": 2.5}, "positive integer"),
    ({"probe_sampling": "topk"}, "probe_sampling"),
])
def test_bad_params(params, msg):
    with pytest.raises(MethodError, match=msg) as e:
        methods.build("redundancylens", params)
    assert "\n" not in str(e.value)


def test_validate_against_model(tmp_path):
    model, _ = tiny()
    ad = get_adapter(model)
    with pytest.raises(MethodError, match="out of range"):
        methods.build("redundancylens", {"ffn_layers": [4]}).validate(ad)
    with pytest.raises(MethodError, match="not found"):
        methods.build("redundancylens", {"hollow_layers": "auto", "calibration_hollow": str(tmp_path / "x.json")}).validate(ad)


def test_method_yaml_builds():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "method" / "redundancylens.yaml")
    m = methods.build(cfg.name, OmegaConf.to_container(cfg.params))
    assert m.resolved_layers(32) == ([], [])


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [-1, 2**32, True, 2.5])
def test_seed_out_of_range_is_named(value):
    import methods
    from methods.base import MethodError

    with pytest.raises(MethodError) as e:
        methods.build("redundancylens", {"seed": value})
    assert str(e.value).startswith(f"method.params.seed={methods.show(value)}: redundancylens: "), str(e.value)
    assert methods.build("redundancylens", {"seed": 2**32 - 1}).seed == 2**32 - 1
