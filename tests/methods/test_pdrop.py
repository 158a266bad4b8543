"""PyramidDrop: the stage schedule and cache; the kept sets and logits equal a plain reference (loops, the
full eager attention matrix by hand); no-op identity; cached == uncached greedy and padded batch == single
prompts on every LLM-side family; the kept count on every sample; counted FLOPs == analytic; the paper's
FLOPs; budgets (tokens at the first drop, FLOPs solved); SDPA throughout; bad parameters; the configs."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness import budget as B
from harness.efficiency import flops as F
from harness.efficiency.analytic import ModelShapes
from harness.models import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from methods.pdrop import pdrop_paper_tflops
from tests.methods import plain_reference as P
from tests.methods.helpers import check_decode_consistency, forward, greedy_uncached, make_inputs, tiny

ROOT = Path(__file__).resolve().parents[2]
STAGES = [1, 2, 3]


def apply(model, **params):
    m = methods.build("pdrop", params)
    return m.apply(model, get_adapter(model)), m


# ---- the plain reference ------------------------------------------------------------------------------
def plain_pdrop(model, inputs, layers, lam, keep=None):
    """PyramidDrop by hand: at each stage layer, the full eager attention matrix of that layer's heads on
    its input, the last row averaged over heads, the top visual tokens kept (a Python sort)."""
    adapter = get_adapter(model)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    n_vis = sum(visual)
    counts = []
    for s in range(len(layers)):
        if keep is None:
            counts.append(int(n_vis * lam ** (s + 1) + 1e-9))
        else:
            counts.append(keep if s == 0 else int(keep * lam ** s + 1e-9))
    inv_freq = adapter.language_model.rotary_emb.inv_freq

    def select(i, h, idx, pos):
        if i not in layers:
            return None
        layer = adapter.llm_layers[i]
        qkv = P.heads_qkv(layer, layer.input_layernorm(h), pos, inv_freq, which="qk")
        rows = [P.attention_matrix(q, k, layer.self_attn.scaling)[-1] for q, k in zip(qkv["q"], qkv["k"])]
        score = sum(rows) / len(rows)
        vis_rows = [r for r in range(len(idx)) if visual[int(idx[r])]]
        ranked = sorted(vis_rows, key=lambda r: float(score[r]), reverse=True)
        chosen = set(ranked[: counts[layers.index(i)]])
        return torch.tensor([r for r in range(len(idx)) if not visual[int(idx[r])] or r in chosen])

    return P.run(model, adapter, inputs, select)


@pytest.mark.parametrize("lm,gqa,params", [
    ("llama", False, {"layers": [1, 2, 3], "lam": 0.5}),
    pytest.param("qwen2", True, {"layers": [1, 3], "lam": 0.6}, marks=pytest.mark.slow),
    pytest.param("llama", True, {"layers": [2, 3], "lam": 0.5, "keep": 20}, marks=pytest.mark.slow),
])
def test_kept_sets_and_logits_equal_the_plain_reference(lm, gqa, params):
    model, proc = tiny("llava", lm, gqa=gqa)
    ref_logits, ref_kept = plain_pdrop(model, make_inputs(proc, (1,)), params["layers"], params["lam"], params.get("keep"))
    apply(model, **params)
    inp = make_inputs(proc, (1,))
    logits = forward(model, inp).logits[0, -1]
    red = LR.get_reducer(model)
    for layer, kept in ref_kept.items():
        assert red.state.cache_idx[layer][0].tolist() == kept, layer
    assert sorted(ref_kept) == params["layers"]
    delta = float((logits - ref_logits).abs().max())
    assert delta < 1e-4, delta


def test_stages_shrink_the_sequence_and_the_cache():
    model, proc = tiny("llava", "llama")
    apply(model, layers=STAGES, lam=0.5)
    inp = make_inputs(proc, (0, 1, 2))  # left padded
    P_ = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    ctx = get_context(model)
    assert ctx.visual_tokens_per_layer == [64, 32, 16, 8]
    assert ctx.visual_tokens_final == 32  # the token budget counts the first drop
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P_, P_ - 32, P_ - 48, P_ - 56]
    visual = inp["input_ids"] == model.config.image_token_id
    red = LR.get_reducer(model)
    for layer, n in zip(STAGES, (32, 16, 8)):  # the kept count on every sample, all text kept
        idx = red.state.cache_idx[layer]
        for b in range(3):
            assert int(visual[b, idx[b]].sum()) == n
            assert int((~visual[b, idx[b]]).sum()) == int((~visual[b]).sum())


@pytest.mark.parametrize("params", [{"lam": 1.0}, {"lam": 1.0, "keep_ratio": 1.0}, {"lam": 1.0, "layers": [9, 99]}])
def test_noop_identical_logits(params):
    base, proc = tiny("llava", "llama", gqa=True)
    inp = make_inputs(proc, (0, 1, 2, 3))
    model, m = apply(copy.deepcopy(base), **params)
    assert LR.get_reducer(model) is None
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)
    assert methods.get("pdrop").noop == {"lam": 1.0}


def test_cached_equals_uncached_and_batch_equals_single_llava():
    model, proc = tiny("llava", "qwen2", gqa=True)
    apply(model, layers=STAGES, lam=0.5)
    check_decode_consistency(model, proc, steps=2)


@pytest.mark.slow
def test_cached_equals_uncached_renumbered_positions():
    model, proc = tiny("llava", "mistral", gqa=True)
    apply(model, layers=[1, 3], lam=0.5, positions="renumber")
    check_decode_consistency(model, proc, steps=2)


# ---- every LLM-side family ---------------------------------------------------------------------------
def _family_model(family):
    from tests.methods.test_families import model_and_processor

    if family in ("llava", "llava_next"):
        from tests.methods.helpers import fresh_model, processor

        return fresh_model(family, gqa=True), processor(family)
    return model_and_processor(family)


def _family_batch(family, proc, texts):
    from tests.methods.helpers import inputs

    if family in ("llava", "llava_next"):
        return inputs(proc, [[(64, 96)]] * len(texts), texts)
    from tests.methods.test_families import batch

    return batch(proc, texts)


#: ~4 s each: one family in `make test`, the other four with the slow tests (CI runs them); test_dart.py
#: runs another one fast
FAMILY = pytest.mark.parametrize("family", ["qwen2_vl"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("llava", "llava_next", "qwen2_5_vl", "llava_onevision")])
TEXTS = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]


@FAMILY
def test_family_cached_uncached_batch_single_and_flops(family):
    model, proc = _family_model(family)
    methods.build("pdrop", {"layers": STAGES, "lam": 0.5}).apply(model, get_adapter(model))
    both = _family_batch(family, proc, TEXTS)
    assert not bool(both["attention_mask"].all())
    with torch.no_grad():
        gen = model.generate(**both, max_new_tokens=3, do_sample=False)[:, both["input_ids"].shape[1]:]
        first = model(**both).logits[:, -1]  # (positions counting the padding: the selection must not care)
    assert torch.equal(gen, greedy_uncached(model, both, 3))
    for b, t in enumerate(TEXTS):
        one = _single(family, proc, t, b)
        with torch.no_grad():
            single = model.generate(**one, max_new_tokens=3, do_sample=False)[:, one["input_ids"].shape[1]:]
            torch.testing.assert_close(model(**one).logits[0, -1], first[b], rtol=1e-4, atol=1e-4)
        assert torch.equal(single[0], gen[b])
    one = _single(family, proc, TEXTS[0], 0)
    (layout,) = F.layouts_from_inputs(model, one)
    m = methods.build("pdrop", {"layers": STAGES, "lam": 0.5})
    counted = F.count_prefill(model, one)
    assert counted.flops == F.analytic_prefill(model.config, layout, m)
    assert counted.total < sum(F.analytic_prefill(model.config, layout).values())
    with torch.no_grad():
        model(**one)
    assert get_context(model).visual_tokens_per_layer == m.llm_visual_schedule(ModelShapes.from_config(model.config), layout)[0]


def _single(family, proc, text, b):
    """Prompt b of `_family_batch` alone (the same image seeds)."""
    from tests.efficiency.helpers import image
    from tests.methods.helpers import inputs

    if family in ("llava", "llava_next"):
        return inputs(proc, [[(64, 96)]], [text], first=b)
    from tests.methods.test_families import SIZES, prompt

    return proc(images=[image(7 * b + i, s) for i, s in enumerate(SIZES)], text=[prompt(proc, 2, text)],
                return_tensors="pt")


def test_kept_tokens_keep_their_mrope_positions():
    """Qwen2-VL: the patched logits equal the unpatched language model run stage by stage on the tokens the
    reducer kept, with their own 3-D positions (sliced from the model's M-RoPE position ids)."""
    from tests.methods.test_families import batch, model_and_processor

    model, proc = model_and_processor("qwen2_vl")
    ref, _ = model_and_processor("qwen2_vl")
    methods.build("pdrop", {"layers": [2], "lam": 0.5}).apply(model, get_adapter(model))
    inp = batch(proc, ["What is shown?"])
    with torch.no_grad():
        patched = model(**inp).logits[0, -1]
    kept = LR.get_reducer(model).state.cache_idx[2][0]
    assert kept.numel() == inp["input_ids"].shape[1] - 5
    got = {}
    lm = ref.model.language_model
    h = lm.register_forward_pre_hook(lambda mod, a, kw: got.update(kw), with_kwargs=True)
    with torch.no_grad():
        ref(**inp)
    h.remove()
    emb, pos3 = got["inputs_embeds"], got["position_ids"]
    with torch.no_grad():
        hs = emb
        pe = lm.rotary_emb(hs, pos3)
        for i, layer in enumerate(lm.layers):
            if i == 2:
                hs, pos3 = hs[:, kept], pos3[..., kept]
                pe = lm.rotary_emb(hs, pos3)
            mask = torch.ones(hs.shape[1], hs.shape[1], dtype=torch.bool).tril()[None, None]
            hs = layer(hs, attention_mask=mask, position_ids=pos3[0] if pos3.dim() == 3 else pos3, position_embeddings=pe)
        out = ref.lm_head(lm.norm(hs[:, -1]))[0]
    torch.testing.assert_close(patched, out, rtol=1e-5, atol=1e-5)


# ---- FLOPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{"layers": [1, 3], "lam": 0.7, "keep": 40, "positions": "renumber"},
                                    pytest.param({"layers": STAGES, "lam": 0.5}, marks=pytest.mark.slow),
                                    pytest.param({"layers": [2], "lam": 0.3}, marks=pytest.mark.slow)])
def test_counted_flops_equal_analytic(params):
    model, proc = tiny("llava", "llama", gqa=True)
    _, m = apply(model, **params)
    inp = make_inputs(proc, (2,))
    layout = F.layouts_from_inputs(model, inp)[0]
    counted = F.count_prefill(model, inp).flops
    assert counted == F.analytic_prefill(model.config, layout, m)
    assert counted["llm"] < F.analytic_prefill(model.config, layout)["llm"]


@pytest.mark.parametrize("model_name,lam,printed", [
    ("llava15_7b", None, 3.82), ("llava15_7b", 0.5, 1.78), ("llava15_7b", 0.4, 1.54), ("llava15_7b", 0.6, 2.06),
    ("llava_next_7b", None, 20.8), ("llava_next_7b", 0.5, 9.46), ("llava_next_7b", 0.4, 8.22), ("llava_next_7b", 0.6, 11.0),
])
def test_paper_flops(model_name, lam, printed):
    """Tables 1 / 4 / 5 "Infer Flops(T)": the LLM over the visual tokens only, MACs, to the printed digits."""
    digits = len(str(printed).split(".")[1])
    assert round(pdrop_paper_tflops(model_name, lam), digits) == printed


@pytest.mark.parametrize("model_name,printed", [("llava15_7b", 2.01), ("llava_next_7b", 10.6)])
def test_paper_flops_of_its_fastv_rows(model_name, printed):
    """Table 5's FastV rows (K=2, R=50 %) in the same convention: one drop at layer 2 keeping half."""
    digits = len(str(printed).split(".")[1])
    assert round(pdrop_paper_tflops(model_name, 0.5, layers=(2,)), digits) == printed


# ---- budgets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.33, 20])
def test_token_budget_counts_the_first_drop(value):
    model, proc = tiny("llava", "llama")
    adapter = get_adapter(model)
    m, info = B.resolve(methods.build("pdrop", {"layers": STAGES}), adapter, {"kind": "tokens", "value": value})
    expected = B.prompt_count(value, 64)
    assert info["visual_tokens_to_llm"] == expected == m.visual_tokens_kept(B.layout_for(adapter, 64))
    m.apply(model, adapter)
    forward(model, make_inputs(proc, (1,)))
    ctx = get_context(model)
    assert ctx.visual_tokens_final == expected
    assert ctx.visual_tokens_per_layer == [64, expected, int(expected * 0.5), int(expected * 0.25)]


def test_flops_budget_is_solved():
    model, _ = tiny("llava", "llama")
    adapter = get_adapter(model)
    m, info = B.resolve(methods.build("pdrop", {"layers": STAGES}), adapter, {"kind": "flops", "value": 0.8})
    assert abs(info["predicted_flops_ratio"] - 0.8) < 0.02
    assert m.keep == info["knob"]["keep"]


# ---- SDPA throughout -----------------------------------------------------------------------------------
def test_every_layer_stays_on_sdpa():
    model, proc = tiny("llava", "llama", gqa=True)
    apply(model, layers=STAGES, lam=0.5)
    P.assert_sdpa_everywhere(model, make_inputs(proc, (0, 1)))


# ---- parameters ----------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("param,value", [
    ("lam", 0.0), ("lam", 1.5), ("lam", float("nan")), ("lam", float("inf")), ("lam", "half"), ("lam", True),
    ("layers", []), ("layers", [0, 8]), ("layers", [8, 8]), ("layers", [16, 8]), ("layers", [2.5]), ("layers", "8"),
    ("layers", [True]), ("keep", 0), ("keep", -1), ("keep", 2.5), ("keep", True), ("keep", float("inf")),
    ("keep_ratio", 0.0), ("keep_ratio", 1.5), ("keep_ratio", float("nan")), ("keep_ratio", "a"),
    ("positions", "shift"), ("positions", 3),
])
def test_bad_parameters_one_line_naming_the_key(param, value):
    with pytest.raises(MethodError) as e:
        methods.build("pdrop", {param: value})
    msg = str(e.value)
    assert msg.startswith(f"method.params.{param}="), msg
    assert "\n" not in msg


@pytest.mark.bad_input
def test_keep_and_keep_ratio_together_are_refused():
    with pytest.raises(MethodError, match="either keep or keep_ratio"):
        methods.build("pdrop", {"keep": 10, "keep_ratio": 0.5})


@pytest.mark.bad_input
@pytest.mark.parametrize("params,match", [({"layers": [1, 4]}, "must all be < the number of LLM layers"),
                                          ({"layers": [1], "keep": 65}, "exceeds the 64 visual tokens")])
def test_validate_against_model(params, match):
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match=match) as e:
        methods.build("pdrop", params).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["pdrop", "pdrop_paper"])
def test_config_files_build(name):
    cfg = yaml.safe_load((ROOT / f"conf/method/{name}.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert (m.layers, m.lam) == ([8, 16, 24], 0.5)
    tiny_cfg = yaml.safe_load((ROOT / f"conf/model_method/tiny_{name}.yaml").read_text())
    assert tiny_cfg["params"]["layers"] == [2, 4, 6]  # the 8-layer embedded tiny model


def test_example_really_reduces_on_the_tiny_model():
    model, proc = tiny("llava", "llama")
    methods.build("pdrop", methods.get("pdrop").example).apply(model, get_adapter(model))
    forward(model, make_inputs(proc, (0,)))
    assert get_context(model).visual_tokens_per_layer[-1] < 64
    assert math.isclose(sum(get_context(model).visual_tokens_per_layer) / 4, (64 + 32 + 16 + 8) / 4)
