"""Compositions (`methods/compose.py`): for every defined composition (ShortV / RedundancyLens + FastV /
random) on LLaVA and LLaVA-NeXT with Llama, Mistral and Qwen2 language models: the no-op is the identity,
cached == uncached and batch == single, counted FLOPs == the analytic FLOPs composed from the members'
formulas; the layer-wise member really acts on the kept tokens after the drop (== the simulation
reference on the dropped model); the refusal rules; budgets; the record key carries the members."""
from __future__ import annotations

import copy

import pytest
import torch

import methods
from harness.efficiency.flops import analytic_prefill, count_prefill, layouts_from_inputs
from harness.models.adapter import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context, install_context
from methods._shared.reduced_layer import patch_simulation
from methods.base import MethodError
from tests.methods.helpers import check_decode_consistency, forward, make_inputs, tiny

SHORTV = {"name": "shortv", "params": {"layers": [3, 0]}}
RLENS = {"name": "redundancylens", "params": {"hollow_layers": [0, 2], "ffn_layers": [2, 3], "window": 12,
                                              "hollow_block": 8, "ffn_keep": 0.25}}
FASTV = {"name": "fastv", "params": {"K": 2, "keep_ratio": 0.5}}
RANDOM = {"name": "random", "params": {"keep_ratio": 0.5}}
#: every defined composition, with member settings that reduce on the 4-layer tiny LLM (the layer-wise
#: member has layers both before and after FastV's drop at K=2)
COMPOSITIONS = {
    "shortv+fastv": [SHORTV, FASTV],
    "shortv+random": [{"name": "shortv", "params": {"layers": [1, 2]}}, RANDOM],
    "redundancylens+fastv": [RLENS, FASTV],
    "redundancylens+random": [RLENS, RANDOM],
}
NOOPS = {
    "shortv+fastv": [{"name": "shortv", "params": {"layers": []}}, {"name": "fastv", "params": {"R": 0.0}}],
    "shortv+random": [{"name": "shortv", "params": {"layers": [0, 1, 2], "N": 0}}, {"name": "random", "params": {"keep_ratio": 1.0}}],
    "redundancylens+fastv": [{"name": "redundancylens"}, {"name": "fastv", "params": {"keep_ratio": 1.0}}],
    "redundancylens+random": [{"name": "redundancylens", "params": {"ffn_keep": 1.0, "ffn_layers": [1]}},
                              {"name": "random", "params": {"keep_ratio": 1.0}}],
}
MODELS = [("llava", "llama", False), ("llava", "mistral", True), ("llava", "qwen2", True),
          ("llava_next", "llama", False), ("llava_next", "qwen2", True)]


def compose(members):
    return methods.build("compose", {"members": copy.deepcopy(members)})


def applied(members, family="llava", lm="llama", gqa=False):
    model, proc = tiny(family, lm, gqa=gqa)
    m = compose(members)
    m.apply(model, get_adapter(model))
    return model, proc, m


def size_for(family):
    return (128, 64) if family == "llava_next" else (64, 64)


# ---- identity, cache, batch ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NOOPS))
@pytest.mark.parametrize("family,lm,gqa", [("llava", "mistral", True), ("llava_next", "qwen2", True)])
def test_noop_is_identity(name, family, lm, gqa):
    base, proc = tiny(family, lm, gqa=gqa)
    inp = make_inputs(proc, (0, 1, 2, 3), size=size_for(family))
    model, _, _ = applied(NOOPS[name], family, lm, gqa)
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
@pytest.mark.parametrize("family,lm,gqa", MODELS)
def test_cached_equals_uncached_and_batch_equals_single(name, family, lm, gqa):
    model, proc, _ = applied(COMPOSITIONS[name], family, lm, gqa)
    check_decode_consistency(model, proc, steps=2, size=size_for(family))


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_composition_differs_from_each_member_alone(name):
    """Both members act: the composition's logits are neither member's alone."""
    model, proc, m = applied(COMPOSITIONS[name], "llava", "qwen2", True)
    inp = make_inputs(proc, (0, 1))
    out = forward(model, inp).logits[:, -1]
    for spec in COMPOSITIONS[name]:
        alone, _ = tiny("llava", "qwen2", gqa=True)
        methods.build(spec["name"], spec.get("params") or {}).apply(alone, get_adapter(alone))
        assert not torch.allclose(forward(alone, inp).logits[:, -1], out, atol=1e-5)


@pytest.mark.parametrize("drop", [FASTV, RANDOM])
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava_next", "mistral", True)])
def test_frozen_layers_after_the_drop_freeze_the_kept_visual_tokens(drop, family, lm, gqa):
    """ShortV + a drop == the drop with ShortV's simulation reference (dense layer, visual rows reset to
    the layer input) on the frozen layers, which sees the kept tokens only after the drop: logits of a
    padded batch, greedy decode and the per-layer KV-cache lengths agree."""
    layers = [3, 0] if drop is FASTV else [1, 2]
    members = [{"name": "shortv", "params": {"layers": layers}}, drop]
    model, proc, _ = applied(members, family, lm, gqa)
    ref, _ = tiny(family, lm, gqa=gqa)
    ad = get_adapter(ref)
    ctx = install_context(ref, ad)
    for i in layers:
        patch_simulation(ad.llm_layers[i], ctx, lambda c: c.visual_mask)
    methods.build(drop["name"], drop["params"]).apply(ref, ad)
    inp = make_inputs(proc, (0, 1, 2, 3), size=size_for(family))
    seen = {}
    after = max(layers)  # a frozen layer after the drop (FastV: K=2; random: before layer 0)

    def hook(module, args, kwargs, output):
        seen["in"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["out"] = output[0] if isinstance(output, tuple) else output

    handle = get_adapter(model).llm_layers[after].register_forward_hook(hook, with_kwargs=True)
    a, b = forward(model, inp, use_cache=True), forward(ref, inp, use_cache=True)
    handle.remove()
    idx = LR.get_reducer(model).state.cache_idx[after]  # prefill indices of the tokens alive at that layer
    visual = (inp["input_ids"] == model.config.image_token_id).gather(1, idx)
    assert seen["in"].shape[1] == idx.shape[1] < inp["input_ids"].shape[1]  # it ran on the kept tokens
    assert torch.equal(seen["in"][visual], seen["out"][visual])  # kept visual rows pass through unchanged
    assert not torch.equal(seen["in"][~visual], seen["out"][~visual])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    L = len(ad.llm_layers)
    assert [a.past_key_values.get_seq_length(i) for i in range(L)] == [b.past_key_values.get_seq_length(i) for i in range(L)]
    # and the dense model with only the drop differs (the frozen layers after the drop did something)
    plain, _ = tiny(family, lm, gqa=gqa)
    methods.build(drop["name"], drop["params"]).apply(plain, get_adapter(plain))
    assert not torch.allclose(forward(plain, inp).logits[:, -1], a.logits[:, -1], atol=1e-5)


# ---- FLOPs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
@pytest.mark.parametrize("family,lm,gqa", [("llava", "llama", False), ("llava", "mistral", True),
                                           ("llava_next", "qwen2", True)])
def test_counted_flops_equal_analytic(name, family, lm, gqa):
    model, proc, m = applied(COMPOSITIONS[name], family, lm, gqa)
    inp = make_inputs(proc, (1,), size=size_for(family))
    layout = layouts_from_inputs(model, inp)[0]
    counted = count_prefill(model, inp).flops
    analytic = analytic_prefill(model.config, layout, m)
    assert counted == analytic
    # less than each member alone: the savings compose
    for spec in COMPOSITIONS[name]:
        alone = methods.build(spec["name"], spec.get("params") or {})
        assert analytic["llm"] < analytic_prefill(model.config, layout, alone)["llm"]


def test_analytic_is_composed_from_the_members_formulas():
    """ShortV + FastV on LLaVA-1.5-7B shapes: frozen layers before K cost ShortV's formula at all visual
    tokens, after K at the kept ones (spec A7 per layer), plus FastV's score row."""
    from harness.efficiency.analytic import TokenLayout, llm_layer_macs
    from harness.efficiency.flops import synthetic_layout
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR
    from harness.efficiency.analytic import ModelShapes
    from harness.models.loading import config_from_cfg

    config = config_from_cfg(OmegaConf.load(CONF_DIR / "model" / "llava15_7b.yaml"))
    shapes = ModelShapes.from_config(config)
    s = shapes.llm
    layout = TokenLayout(before=5, visual=576, after=59)
    m = compose([{"name": "shortv", "params": {"layers": [31, 0, 5]}}, {"name": "fastv", "params": {"K": 2, "R": 0.5}}])
    T, t, Th = layout.total, layout.text, layout.total - 288

    def frozen(n):
        return llm_layer_macs(s, n_q=t, n_kv=n, n_k=n, n_o=t, n_ffn=t)

    expected = frozen(T) + llm_layer_macs(s, T) + 2 * frozen(Th) + 28 * llm_layer_macs(s, Th) + s.heads * T * s.head_dim
    assert m.analytic_prefill_macs(shapes, layout)["llm"] == expected
    del synthetic_layout


# ---- rules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("members,match", [
    ([], "non-empty"),
    ([FASTV, SHORTV], "layer-wise member first"),
    ([SHORTV, RLENS], "two layer-wise"),
    ([SHORTV, FASTV, RANDOM], "two token-dropping"),
    ([SHORTV], "one layer-wise member"),
    ([SHORTV, {"name": "ficoco_l"}], "bypass"),
    ([{"name": "tome"}, FASTV], "vision-side"),
    ([SHORTV, {"name": "none"}], "leave it out"),
    ([SHORTV, {"name": "compose", "params": {}}], "do not nest"),
    ([SHORTV, {"name": "nosuch"}], "unknown method"),
    ([SHORTV, {"name": "fastv", "params": {"R": 1.5}}], r"members\[1\] \(fastv\).*R must be"),
    ([SHORTV, {"name": "fastv", "extra": 1}], "unknown key"),
    (["fastv", "shortv"], "must be a mapping"),
])
def test_refused(members, match):
    with pytest.raises(MethodError, match=match):
        compose(members)


@pytest.mark.parametrize("layer", [{"name": "shortv", "params": {"layers": [1]}},
                                   {"name": "redundancylens", "params": {"hollow_layers": [1], "window": 4}}])
def test_refuses_reducing_fastvs_scoring_layer(layer):
    model, _ = tiny("llava", "llama")
    m = compose([layer, FASTV])
    with pytest.raises(MethodError, match="scoring layer"):
        m.apply(model, get_adapter(model))


def test_describe_and_params_name_the_members():
    m = compose(COMPOSITIONS["shortv+fastv"])
    assert m.describe().startswith("shortv(") and " + fastv(" in m.describe()
    resolved = m.member_params()
    assert [r["name"] for r in resolved] == ["shortv", "fastv"]
    assert resolved[1]["params"]["K"] == 2 and "positions" in resolved[1]["params"]


# ---- budgets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_token_budget_is_solved_over_the_dropping_member(family):
    from harness import budget as B

    model, _ = tiny(family, "llama")
    ad = get_adapter(model)
    m, info = B.resolve(compose(COMPOSITIONS["shortv+fastv"]), ad, {"kind": "tokens", "value": 0.25, "text_tokens": 16})
    drop = m.member_params()[1]["params"]
    assert drop["keep_ratio"] == 0.25 and m.member_params()[0]["params"]["layers"] == [3, 0]
    layout = B.layout_for(ad, 16)
    assert info["visual_tokens_to_llm"] == B.prompt_count(0.25, layout.visual)


def test_flops_budget_is_solved_over_the_dropping_member():
    from harness import budget as B

    model, _ = tiny("llava", "llama")
    ad = get_adapter(model)
    start = compose([SHORTV, {"name": "fastv", "params": {"K": 2}}])
    m, info = B.resolve(start, ad, {"kind": "flops", "value": 0.6, "text_tokens": 16})
    assert list(info["knob"]) == ["fastv.keep"]
    assert abs(info["predicted_flops_ratio"] - 0.6) < 0.05
    assert m.member_params()[1]["params"]["keep"] == info["knob"]["fastv.keep"]


# ---- records -------------------------------------------------------------------------------------------
def test_record_key_carries_members_and_their_calibration(tmp_path):
    from harness.results import _calibration
    import methods as registry

    art = tmp_path / "a.json"
    art.write_text('{"ranking": [0, 1, 2, 3]}')
    params = {"members": [{"name": "shortv", "params": {"layers": "auto", "N": 2, "calibration": str(art)}}, FASTV]}
    cal = _calibration({"calibration": {"n": 8}}, registry, "compose", params)
    assert cal["n"] == 8 and cal["members.0.shortv.calibration_sha256"]
    assert _calibration({}, registry, "compose", {"members": [SHORTV, FASTV]}) is None


def test_text_only_prompt_unchanged():
    model, proc, _ = applied(COMPOSITIONS["shortv+fastv"])
    base, _ = tiny("llava", "llama")
    inp = proc(text=["USER: What is shown? ASSISTANT:", "USER: Which letter? ASSISTANT:"], return_tensors="pt", padding=True)
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)
    assert get_context(model) is not None and LR.get_reducer(model) is not None


def test_flops_cli_prints_the_composition_and_its_ratio():
    """`vtbench-flops model=llava15_7b method=shortv_fastv convention=shortv`: ShortV Table 5's 29 % row."""
    from harness.efficiency.flops_table import compute, render_table as render

    r = compute(["model=llava15_7b", "method=shortv_fastv"], convention="shortv")
    conv = r["conventions"]["shortv"]
    assert round(conv["total"] / 1e12, 2) == 2.53 and round(100 * conv["ratio"], 1) == 29.7
    assert "2.53 TFLOPs = 29.7 % of 8.50 (none)" in render(r)
    r = compute(["model=llava15_7b", "method=shortv_fastv", "method.params.members.1.params.R=0.5"], convention="shortv")
    assert round(100 * r["conventions"]["shortv"]["ratio"]) == 34


@pytest.mark.bad_input
def test_member_parameter_errors_name_the_member_key():
    import methods
    from methods.base import MethodError

    members = [{"name": "shortv", "params": {"layers": [3], "N": 1}}, {"name": "fastv", "params": {"keep": 0}}]
    with pytest.raises(MethodError) as e:
        methods.build("compose", {"members": members})
    assert str(e.value).startswith("method.params.members.1.params.keep=0: compose: members[1] (fastv): fastv: keep")
