"""DART: kept sets and logits equal a plain reference (loops over pivots and tokens, cosine by hand, the
full eager decoder); exactly `keep` visual tokens on every sample; no-op identity; cached == uncached greedy
and padded batch == single prompts on every LLM-side family; counted FLOPs == analytic; budgets; SDPA
throughout (no attention weights); bad parameters; the configs."""
from __future__ import annotations

import copy
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
from methods.dart import quotas
from tests.methods import plain_reference as P
from tests.methods.helpers import check_decode_consistency, forward, greedy_uncached, make_inputs, tiny
from tests.methods.test_pdrop import TEXTS, _family_batch, _family_model, _single

ROOT = Path(__file__).resolve().parents[2]


def apply(model, **params):
    m = methods.build("dart", params)
    return m.apply(model, get_adapter(model)), m


# ---- the plain reference ------------------------------------------------------------------------------
def plain_dart(model, inputs, K, keep, pivot_image, pivot_text):
    """DART by hand (batch 1): keys of layer K-1 on its input, their L1 norms (sum over heads and channels),
    pivots by a Python sort, cosine similarities one pair at a time, and per pivot the least similar free
    visual tokens."""
    adapter = get_adapter(model)
    lm = adapter.language_model
    visual = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    inv_freq = lm.rotary_emb.inv_freq
    seen = {}

    def select(i, h, idx, pos):
        if i == K - 1:
            seen["h"], seen["pos"] = h, pos
        if i != K:
            return None
        layer = adapter.llm_layers[K - 1]
        keys = P.heads_qkv(layer, layer.input_layernorm(seen["h"]), seen["pos"], inv_freq, which="k")["k"]
        norm = [sum(float(k[r].abs().sum()) for k in keys) for r in range(len(idx))]
        feats = lm.norm(h)
        vis_rows = [r for r in range(len(idx)) if visual[int(idx[r])]]
        last_vis = max(vis_rows)
        text_rows = [r for r in range(len(idx)) if r > last_vis and not visual[int(idx[r])]]
        img_piv = sorted(vis_rows, key=lambda r: -norm[r])[: min(pivot_image, keep)]
        txt_piv = sorted(text_rows, key=lambda r: -norm[r])[:pivot_text]
        kept = set(img_piv)
        remaining = keep - len(img_piv)
        pivots = img_piv + txt_piv
        for j, p in enumerate(pivots):
            if remaining <= 0:
                break
            quota = remaining // len(pivots) + (1 if j < remaining % len(pivots) else 0)
            free = [r for r in vis_rows if r not in kept]

            def cos(r):
                a, b = feats[p], feats[r]
                return float(a @ b) / (float(a.norm()) * float(b.norm()))

            kept.update(sorted(free, key=cos)[:quota])
        return torch.tensor([r for r in range(len(idx)) if not visual[int(idx[r])] or r in kept])

    return P.run(model, adapter, inputs, select)


@pytest.mark.parametrize("lm,gqa,params", [
    ("llama", False, {"K": 2, "keep": 16, "pivot_image": 4, "pivot_text": 4}),
    pytest.param("qwen2", True, {"K": 1, "keep": 21, "pivot_image": 3, "pivot_text": 2}, marks=pytest.mark.slow),
    # fewer text tokens than pivots
    pytest.param("llama", True, {"K": 3, "keep": 10, "pivot_image": 2, "pivot_text": 50}, marks=pytest.mark.slow),
])
def test_kept_sets_and_logits_equal_the_plain_reference(lm, gqa, params):
    model, proc = tiny("llava", lm, gqa=gqa)
    inp = make_inputs(proc, (1,))
    ref_logits, ref_kept = plain_dart(model, inp, params["K"], params["keep"], params["pivot_image"], params["pivot_text"])
    apply(model, **params)
    logits = forward(model, inp).logits[0, -1]
    kept = LR.get_reducer(model).state.cache_idx[params["K"]][0].tolist()
    assert kept == ref_kept[params["K"]]
    visual = inp["input_ids"][0] == model.config.image_token_id
    assert int(visual[kept].sum()) == params["keep"]
    delta = float((logits - ref_logits).abs().max())
    assert delta < 1e-4, delta


def test_quotas_split_evenly_and_sum():
    for n, p in [(12, 8), (128, 8), (3, 5), (0, 4), (17, 1)]:
        q = quotas(n, p)
        assert sum(q) == n and len(q) == p and max(q) - min(q) <= 1 and q == sorted(q, reverse=True)


def test_exact_keep_on_every_sample_and_cache():
    model, proc = tiny("llava", "llama", gqa=True)
    apply(model, K=2, keep=13)
    inp = make_inputs(proc, (0, 1, 2, 3))  # left padded, four prompt lengths
    P_ = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    assert get_context(model).visual_tokens_per_layer == [64, 64, 13, 13]
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P_, P_, P_ - 51, P_ - 51]
    visual = inp["input_ids"] == model.config.image_token_id
    idx = LR.get_reducer(model).state.cache_idx[2]
    for b in range(4):
        assert int(visual[b, idx[b]].sum()) == 13
        assert int((~visual[b, idx[b]]).sum()) == int((~visual[b]).sum())


@pytest.mark.parametrize("params", [{"keep_ratio": 1.0}, {"keep_ratio": 1.0, "K": 99}])
def test_noop_identical_logits(params):
    base, proc = tiny("llava", "qwen2", gqa=True)
    inp = make_inputs(proc, (0, 1, 2, 3))
    model, _ = apply(copy.deepcopy(base), **params)
    assert LR.get_reducer(model) is None
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)
    assert methods.get("dart").noop == {"keep_ratio": 1.0}


def test_cached_equals_uncached_and_batch_equals_single_llava():
    model, proc = tiny("llava", "mistral", gqa=True)
    apply(model, K=1, keep=12, pivot_image=2, pivot_text=3)
    check_decode_consistency(model, proc, steps=2)


#: ~3 s each: one family in `make test` (left padding with positions that count it), the other four with the
#: slow tests (CI runs them)
FAMILY = pytest.mark.parametrize("family", ["llava_next"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("llava", "qwen2_vl", "qwen2_5_vl", "llava_onevision")])


@FAMILY
def test_family_cached_uncached_batch_single_and_flops(family):
    model, proc = _family_model(family)
    params = {"K": 1, "keep": 4, "pivot_image": 1, "pivot_text": 2}
    methods.build("dart", params).apply(model, get_adapter(model))
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
    m = methods.build("dart", params)
    counted = F.count_prefill(model, one)
    assert counted.flops == F.analytic_prefill(model.config, layout, m)
    assert counted.total < sum(F.analytic_prefill(model.config, layout).values())
    with torch.no_grad():
        model(**one)
    assert get_context(model).visual_tokens_per_layer == m.llm_visual_schedule(ModelShapes.from_config(model.config), layout)[0]


# ---- FLOPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{"K": 2, "keep": 16}, {"K": 1, "keep": 3, "pivot_image": 4},
                                    pytest.param({"K": 3, "keep_ratio": 0.5, "pivot_image": 1, "pivot_text": 60},
                                                 marks=pytest.mark.slow)])
def test_counted_flops_equal_analytic(params):
    model, proc = tiny("llava", "qwen2", gqa=True)
    _, m = apply(model, **params)
    inp = make_inputs(proc, (3,))
    layout = F.layouts_from_inputs(model, inp)[0]
    counted = F.count_prefill(model, inp).flops
    assert counted == F.analytic_prefill(model.config, layout, m)
    assert counted["llm"] < F.analytic_prefill(model.config, layout)["llm"]


def test_duplication_matrix_is_counted():
    """The selection's own MACs: (visual + text pivots) x visual tokens x hidden size, 0 when the pivots
    alone fill the budget."""
    model, proc = tiny("llava", "llama")
    layout = F.layouts_from_inputs(model, make_inputs(proc, (0,)))[0]
    s = ModelShapes.from_config(model.config)
    m = methods.build("dart", {"keep": 16})
    assert m.selection_macs(s, layout) == (4 + min(4, layout.after)) * 64 * s.llm.hidden
    assert methods.build("dart", {"keep": 3}).selection_macs(s, layout) == 0


# ---- budgets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.33, 20])
def test_token_budget(value):
    model, proc = tiny("llava", "llama")
    adapter = get_adapter(model)
    m, info = B.resolve(methods.build("dart", {}), adapter, {"kind": "tokens", "value": value})
    expected = B.prompt_count(value, 64)
    assert info["visual_tokens_to_llm"] == expected
    m.apply(model, adapter)
    forward(model, make_inputs(proc, (1,)))
    assert get_context(model).visual_tokens_final == expected


def test_flops_budget_is_solved():
    model, _ = tiny("llava", "llama")
    m, info = B.resolve(methods.build("dart", {}), get_adapter(model), {"kind": "flops", "value": 0.9})
    assert abs(info["predicted_flops_ratio"] - 0.9) < 0.02 and m.keep == info["knob"]["keep"]


# ---- SDPA throughout -----------------------------------------------------------------------------------
def test_every_layer_stays_on_sdpa():
    model, proc = tiny("llava", "llama", gqa=True)
    apply(model, K=1, keep=10)
    P.assert_sdpa_everywhere(model, make_inputs(proc, (0, 1)))


# ---- parameters ----------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("param,value", [
    ("K", 0), ("K", -1), ("K", 1.5), ("K", True), ("K", "2"), ("keep", 0), ("keep", 2.5), ("keep", True),
    ("keep", float("nan")), ("keep_ratio", 0.0), ("keep_ratio", 1.2), ("keep_ratio", float("inf")),
    ("keep_ratio", "x"), ("pivot_image", 0), ("pivot_image", 1.5), ("pivot_text", -1), ("pivot_text", True),
    ("pivot_text", float("nan")),
])
def test_bad_parameters_one_line_naming_the_key(param, value):
    with pytest.raises(MethodError) as e:
        methods.build("dart", {param: value})
    msg = str(e.value)
    assert msg.startswith(f"method.params.{param}="), msg
    assert "\n" not in msg


@pytest.mark.bad_input
@pytest.mark.parametrize("params,match", [({"K": 4}, "must be < the number of LLM layers"),
                                          ({"keep": 65}, "exceeds the 64 visual tokens")])
def test_validate_against_model(params, match):
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match=match) as e:
        methods.build("dart", params).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,keep", [("dart", None), ("dart_paper", 64)])
def test_config_files_build(name, keep):
    cfg = yaml.safe_load((ROOT / f"conf/method/{name}.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert (m.K, m.keep, m.pivot_image, m.pivot_text) == (2, keep, 4, 4)


def test_example_really_reduces_on_the_tiny_model():
    model, proc = tiny("llava", "llama")
    methods.build("dart", methods.get("dart").example).apply(model, get_adapter(model))
    forward(model, make_inputs(proc, (0,)))
    assert get_context(model).visual_tokens_per_layer == [64, 16, 16, 16]
