"""VisionZip at the CLIP tower's output (methods/visionzip.py): documented no-op, kept count == budget, cached ==
uncached, padded batch == single prompts, counted FLOPs == analytic, one-line refusals and bad input, and
agreement with a plain re-implementation of the official selection / merge (tests/methods/tower_reference.py)."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from harness.budget import prompt_count
from harness.efficiency.flops import layouts_from_inputs
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods.base import MethodError
from methods.visionzip import split_budget
from tests.methods.helpers import (
    check_batch_equals_single,
    check_flops,
    check_meta_flops,
    check_recomputed,
    fresh_model,
    inputs as prompts,
    llm_visual_tokens,
    processor,
    vision_inputs,
)
from tests.methods.tower_reference import feature_layer, llm_logits_with_visual

NAME = "visionzip"
FAMILIES = ["llava", "llava_next"]


def applied(family, **params):
    model = fresh_model(family)
    m = methods.build(NAME, params)
    m.apply(model, get_adapter(model))
    return model, m


def test_published_splits_and_rule():
    assert [split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    for k in range(1, 577):
        d, c = split_budget(k)
        assert d + c == k and c == math.floor(5 * k / 32 + 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("params", [methods.get(NAME).noop, {"tokens": 64}, {"dominant": 54, "contextual": 10}])
def test_documented_noop_is_identical(family, params):
    """No budget, or a budget of all 64 tokens of the tiny tower, leaves the logits bit-identical."""
    model, proc = fresh_model(family), processor(family)
    inp = vision_inputs(proc, [0, 1], family)
    with torch.no_grad():
        ref = model(**inp).logits
    methods.build(NAME, params).apply(model, get_adapter(model))
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [0.33, pytest.param(0.125, marks=pytest.mark.slow), 20])
def test_kept_count_equals_budget_on_every_prompt(family, value):
    """Per-prompt budgets on prompts of 1-3 images (NeXT: of different sizes): the LLM receives the count the
    method reports, which is the budget (LLaVA-1.5 one image: exactly; several crops: within crops/2)."""
    model, m = applied(family, prompt_tokens=value)
    proc = processor(family)
    sizes = [[(64, 64)], [(64, 64), (64, 128)], [(128, 64), (64, 64), (96, 80)]]
    for shape in sizes:
        if family == "llava" and len(set(shape)) > 1:
            shape = [(64, 64)] * len(shape)
        inp = prompts(proc, [shape])
        layout = layouts_from_inputs(model, inp)[0]
        got = llm_visual_tokens(model, inp)
        assert got == m.visual_tokens_kept(layout)
        target = prompt_count(value, layout.visual)
        assert abs(got - target) <= max(1, layout.images) / 2, (shape, got, target)
        if family == "llava" and len(shape) == 1:
            assert got == target


@pytest.mark.parametrize("family, params", [
    ("llava", {"tokens": 20}),
    ("llava_next", {"prompt_tokens": 0.33}),
    pytest.param("llava", {"dominant": 5, "contextual": 0}, marks=pytest.mark.slow),
    pytest.param("llava_next", {"dominant": 1, "contextual": 12}, marks=pytest.mark.slow),
    pytest.param("llava", {"prompt_tokens": 0.33}, marks=pytest.mark.slow),
    pytest.param("llava_next", {"tokens": 20}, marks=pytest.mark.slow),
])
def test_counted_flops_equal_analytic(family, params):
    proc = processor(family)
    model, m = applied(family, **params)
    counted = check_flops(model, m, vision_inputs(proc, [1], family))
    dense = check_flops(fresh_model(family), None, vision_inputs(proc, [1], family))
    assert counted.total < dense.total


@pytest.mark.parametrize("params", [{"tokens": 20}, {"prompt_tokens": 0.33}])
def test_cached_equals_uncached_and_batch_equals_single_llava(params):
    model, _ = applied("llava", **params)
    check_batch_equals_single(model, processor("llava"), "llava")


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_cached_equals_uncached_and_batch_equals_single_next(lm):
    model = fresh_model("llava_next", lm)
    methods.build(NAME, {"tokens": 20}).apply(model, get_adapter(model))
    check_batch_equals_single(model, processor("llava_next"), "llava_next")


def test_per_prompt_budget_decode_consistency():
    model, _ = applied("llava_next", prompt_tokens=0.25)
    check_recomputed(model, vision_inputs(processor("llava_next"), [1], "llava_next"))


# ---- the independent reference ---------------------------------------------------------------------------
def reference_visionzip(h, cls_rows, keys, dominant, contextual):
    """The official selection and merge, in plain Python: dominant = [CLS] + the dominant-1 patches with the
    largest head-summed CLS attention; the rest merged into `contextual` uniformly spaced targets by cosine
    similarity of their head-mean keys (target + mean of the tokens that joined it). Returns (tokens [k, D],
    dominant patch indices, target patch indices)."""
    N = h.shape[0]
    P = N - 1
    score = [sum(row[1 + j] for row in cls_rows) for j in range(P)]
    ranked = sorted(range(P), key=lambda j: -score[j])
    chosen = sorted(ranked[: dominant - 1])
    out = [h[0]] + [h[1 + j] for j in chosen]
    rest = [j for j in range(P) if j not in set(chosen)]
    if contextual == 0:
        return torch.stack(out), chosen, [], {}
    metric = []
    for j in rest:
        v = sum(keys[head, 1 + j] for head in range(keys.shape[0])) / keys.shape[0]
        metric.append(v / v.norm())
    M = len(rest)
    step = max(1, M // contextual)
    t_pos = list(range(0, M, step))[:contextual]
    groups = {t: [] for t in t_pos}
    for i in range(M):
        if i in groups:
            continue
        best, best_sim = None, None
        for t in t_pos:
            s = float(metric[i] @ metric[t])
            if best_sim is None or s > best_sim:
                best, best_sim = t, s
        groups[best].append(i)
    for t in t_pos:
        tok = h[1 + rest[t]].clone()
        if groups[t]:
            tok = tok + sum(h[1 + rest[i]] for i in groups[t]) / len(groups[t])
        out.append(tok)
    return torch.stack(out), chosen, [rest[t] for t in t_pos], {rest[t]: [rest[i] for i in groups[t]] for t in t_pos}


@pytest.mark.parametrize("tokens, sample", [(20, 0), (8, 2), pytest.param(40, 2, marks=pytest.mark.slow),
                                            pytest.param(3, 0, marks=pytest.mark.slow)])
def test_agrees_with_plain_reference(tokens, sample, record_property):
    """Identical dominant and target sets, tokens within float error, and the same logits as the unpatched
    model fed the reference's tokens (max |Δlogit| recorded)."""
    model, m = applied("llava", tokens=tokens)
    ref_model = fresh_model("llava")
    inp = vision_inputs(processor("llava"), [sample])
    with torch.no_grad():
        logits = model(**inp).logits[:, -1]
    d, c = split_budget(tokens)
    h, rows, keys = feature_layer(ref_model, inp["pixel_values"])
    ref_tokens, chosen, targets, _ = reference_visionzip(h, rows, keys, d, c)
    sel = m.last_selection
    assert sel["dominant"][0].tolist() == chosen
    assert (sel["targets"][0].tolist() if c else []) == targets
    ref_logits = llm_logits_with_visual(ref_model, inp["input_ids"], ref_tokens)
    delta = float((logits - ref_logits).abs().max())
    record_property("max_abs_dlogit", delta)
    assert delta < 1e-4, delta


def test_asked_cell_recall_follows_what_was_kept():
    """harness/recall.py reads the kept content (not a silent 1.0): a dominant patch carries all of itself, a
    contextual token 1/2 of its target and 1/(2 n) of each of the n patches that joined it; [CLS] none."""
    from harness import recall as R

    model, m = applied("llava", tokens=20)
    ref_model = fresh_model("llava")
    R.track(model, True)
    inp = vision_inputs(processor("llava"), [0])
    q = "What colour is the shape in row 2, column 3?"
    with torch.no_grad():
        model(**inp)
    got = R.layer_recall(model, get_adapter(model), inp["input_ids"], [q])[0]
    h, rows, keys = feature_layer(ref_model, inp["pixel_values"])
    _, chosen, targets, groups = reference_visionzip(h, rows, keys, *split_budget(20))
    w = R.cell_patch_weights(R.asked_cell(q), 8)
    carried = sum(w.get(p, 0.0) for p in chosen)
    for t, joined in groups.items():
        if joined:
            carried += w.get(t, 0.0) / 2 + sum(w.get(p, 0.0) for p in joined) / (2 * len(joined))
        else:
            carried += w.get(t, 0.0)
    expected = carried / sum(w.values())
    assert 0 < expected < 1
    assert got == pytest.approx([expected] * len(got), abs=1e-6)
    R.track(model, False)  # without the bookkeeping the recall is not measured (None), never a silent 1.0
    with torch.no_grad():
        model(**inp)
    assert R.layer_recall(model, get_adapter(model), inp["input_ids"], [q]) == [None]


def test_flops_budget_is_solved_over_tokens():
    from harness.budget import resolve
    from harness.efficiency import flops as F

    model = fresh_model("llava")
    m, info = resolve(methods.build(NAME, {}), get_adapter(model), {"kind": "flops", "value": 0.5})
    assert 1 <= m.tokens < 64 and m.prompt_tokens is None and abs(info["predicted_flops_ratio"] - 0.5) < 0.05
    layout = F.synthetic_layout(model.config)
    dense = sum(F.analytic_prefill(model.config, layout).values())
    assert sum(F.analytic_prefill(model.config, layout, m).values()) / dense == pytest.approx(info["predicted_flops_ratio"])
    assert info["visual_tokens_to_llm"] == m.tokens


# ---- refusals and bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_refuses_families_without_cls_in_one_line(family):
    model, _ = build_tiny(family, gqa=True, vision_layers=3)
    with pytest.raises(MethodError, match=f"refuses model family '{family}'.*CLS") as e:
        methods.build(NAME, {"tokens": 4}).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": float("nan")}, "method.params.tokens=nan: .*finite"),
        ({"prompt_tokens": float("inf")}, "method.params.prompt_tokens=inf: .*finite"),
        ({"tokens": 0}, "method.params.tokens=0: .*>= 1"),
        ({"tokens": 2.5}, "method.params.tokens=2.5: .*integer"),
        ({"tokens": "64"}, "method.params.tokens=64: .*integer"),
        ({"tokens": True}, "method.params.tokens=true: .*integer"),
        ({"prompt_tokens": 0}, "method.params.prompt_tokens=0: .*share"),
        ({"prompt_tokens": 2.5}, "method.params.prompt_tokens=2.5: .*share"),
        ({"prompt_tokens": 0.5, "tokens": 10}, "either"),
        ({"dominant": 10}, "both dominant and contextual"),
        ({"dominant": -1, "contextual": 2}, "method.params.dominant=-1: .*>= 0"),
        ({"dominant": 0, "contextual": 0}, "at least one"),
        ({"dominant": 10, "contextual": 2, "tokens": 12}, "either"),
        ({"cls_token": "yes"}, "method.params.cls_token=yes: .*true or false"),
        ({"foo": 1}, "no parameter"),
    ],
)
def test_bad_params_one_line(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build(NAME, params)
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": 65}, "exceeds the 64"),
        ({"dominant": 60, "contextual": 10}, "dominant \\+ contextual = 60 \\+ 10 exceeds the 64"),
        ({"dominant": 0, "contextual": 3}, "dominant >= 1"),
    ],
)
def test_impossible_budgets_fail_validation_in_one_line(params, match):
    model = fresh_model("llava")
    with pytest.raises(MethodError, match=match) as e:
        methods.build(NAME, params).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_full_size_meta_count_equals_analytic():
    check_meta_flops(NAME, {"prompt_tokens": 64})
    check_meta_flops(NAME, {"dominant": 162, "contextual": 30})
