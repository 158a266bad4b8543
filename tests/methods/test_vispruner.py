"""VisPruner at the CLIP tower's output (methods/vispruner.py): documented no-op, kept count == budget, cached ==
uncached, padded batch == single prompts, counted FLOPs == analytic, one-line refusals and bad input, and
agreement with a plain re-implementation of the official selection (tests/methods/tower_reference.py)."""
from __future__ import annotations

import pytest
import torch

import methods
from harness.budget import prompt_count
from harness.efficiency.flops import layouts_from_inputs
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods.base import MethodError
from methods.vispruner import dedup_rounds
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

NAME = "vispruner"
FAMILIES = ["llava", "llava_next"]


def applied(family, lm="llama", **params):
    model = fresh_model(family, lm)
    m = methods.build(NAME, params)
    m.apply(model, get_adapter(model))
    return model, m


def test_dedup_rounds():
    """576 patches, 64 kept at ratio 0.5: 544 residual tokens thinned 8 per round to 32 (64 rounds); a small
    diverse budget caps a round at |A|."""
    rounds = dedup_rounds(576 - 32, 32)
    assert len(rounds) == 64 and all(r == 8 for _, _, r in rounds) and rounds[0][:2] == (272, 272)
    assert dedup_rounds(10, 1) == [(5, 5, 5), (3, 2, 3), (1, 1, 1)]
    assert dedup_rounds(10, 0) == [] and dedup_rounds(5, 5) == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("params", [methods.get(NAME).noop, {"tokens": 64}])
def test_documented_noop_is_identical(family, params):
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
    model, m = applied(family, prompt_tokens=value)
    proc = processor(family)
    for shape in ([(64, 64)], [(64, 64), (64, 128)], [(128, 64), (64, 64), (96, 80)]):
        if family == "llava":
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
    pytest.param("llava", {"tokens": 9, "important_ratio": 1.0}, marks=pytest.mark.slow),
    pytest.param("llava_next", {"tokens": 30, "important_ratio": 0.0}, marks=pytest.mark.slow),
    pytest.param("llava", {"prompt_tokens": 0.33}, marks=pytest.mark.slow),
    pytest.param("llava_next", {"tokens": 20}, marks=pytest.mark.slow),
])
def test_counted_flops_equal_analytic(family, params):
    model, m = applied(family, **params)
    check_flops(model, m, vision_inputs(processor(family), [1], family))


@pytest.mark.parametrize("family, lm", [("llava", "llama"), ("llava_next", "llama"),
                                        pytest.param("llava_next", "qwen2", marks=pytest.mark.slow)])
def test_cached_equals_uncached_and_batch_equals_single(family, lm):
    model, _ = applied(family, lm, tokens=20)
    check_batch_equals_single(model, processor(family), family)


def test_per_prompt_budget_batch_equals_single_llava():
    model, _ = applied("llava", prompt_tokens=0.2)
    check_batch_equals_single(model, processor("llava"), "llava")


def test_per_prompt_budget_decode_consistency():
    model, _ = applied("llava_next", prompt_tokens=0.25)
    check_recomputed(model, vision_inputs(processor("llava_next"), [1], "llava_next"))


# ---- the independent reference ---------------------------------------------------------------------------
def reference_vispruner(h, cls_rows, tokens, ratio):
    """The official selection in plain Python: the floor(tokens*ratio) patches with the largest head-mean CLS
    attention, then the rest (in that attention order) thinned by rounds that split the list alternately into
    A and B and drop the (up to 8) A tokens most similar (cosine) to some B token. Kept patch indices, sorted."""
    P = h.shape[0] - 1
    H = len(cls_rows)
    score = [sum(row[1 + j] for row in cls_rows) / H for j in range(P)]
    order = sorted(range(P), key=lambda j: (-score[j], j))
    important = int(tokens * ratio)
    diverse = tokens - important
    kept, residual = order[:important], order[important:]
    unit = [h[1 + j] / h[1 + j].norm() for j in range(P)]
    while diverse > 0 and len(residual) > diverse:
        R = len(residual)
        r = min(8, R - diverse, (R + 1) // 2)
        A, B = residual[0::2], residual[1::2]
        redundancy = [max(float(unit[a] @ unit[b]) for b in B) for a in A]
        by = sorted(range(len(A)), key=lambda i: (-redundancy[i], i))
        residual = [A[i] for i in by[r:]] + B
    if diverse > 0:
        kept = kept + residual
    return sorted(kept)


@pytest.mark.parametrize("tokens, ratio, sample", [
    (20, 0.5, 0), (8, 0.75, 2),
    pytest.param(40, 0.5, 2, marks=pytest.mark.slow), pytest.param(5, 0.2, 0, marks=pytest.mark.slow),
])
def test_agrees_with_plain_reference(tokens, ratio, sample, record_property):
    """Identical kept sets and the same logits as the unpatched model fed the reference's tokens."""
    model, m = applied("llava", tokens=tokens, important_ratio=ratio)
    ref_model = fresh_model("llava")
    inp = vision_inputs(processor("llava"), [sample])
    with torch.no_grad():
        logits = model(**inp).logits[:, -1]
    h, rows, _ = feature_layer(ref_model, inp["pixel_values"])
    kept = reference_vispruner(h, rows, tokens, ratio)
    assert m.last_selection[0].tolist() == kept
    ref_logits = llm_logits_with_visual(ref_model, inp["input_ids"], h[1:][kept])
    delta = float((logits - ref_logits).abs().max())
    record_property("max_abs_dlogit", delta)
    assert delta < 1e-4, delta


def test_asked_cell_recall_follows_what_was_kept():
    """harness/recall.py reads the kept patches (not a silent 1.0): the asked cell's weight on the kept ones."""
    from harness import recall as R

    model, m = applied("llava", tokens=12)
    R.track(model, True)
    inp = vision_inputs(processor("llava"), [1])
    q = "Which letter is in row 1, column 1?"
    with torch.no_grad():
        model(**inp)
    got = R.layer_recall(model, get_adapter(model), inp["input_ids"], [q])[0]
    w = R.cell_patch_weights(R.asked_cell(q), 8)
    expected = sum(w.get(p, 0.0) for p in m.last_selection[0].tolist()) / sum(w.values())
    assert got == pytest.approx([expected] * len(got), abs=1e-6)
    assert expected < 1


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
        ({"important_ratio": float("nan")}, "method.params.important_ratio=nan: .*finite"),
        ({"important_ratio": float("-inf")}, "method.params.important_ratio=-inf: .*finite"),
        ({"important_ratio": 1.5}, "method.params.important_ratio=1.5: .*\\[0, 1\\]"),
        ({"important_ratio": -0.1}, "method.params.important_ratio=-0.1: .*\\[0, 1\\]"),
        ({"important_ratio": "half"}, "method.params.important_ratio=half: .*\\[0, 1\\]"),
        ({"important_ratio": True}, "method.params.important_ratio=true: .*\\[0, 1\\]"),
        ({"tokens": -3}, "method.params.tokens=-3: .*>= 1"),
        ({"tokens": [64]}, "method.params.tokens=\\[64\\]: .*integer"),
        ({"prompt_tokens": -0.5}, "method.params.prompt_tokens=-0.5: .*share"),
        ({"prompt_tokens": "all"}, "method.params.prompt_tokens=all: .*share"),
        ({"prompt_tokens": 0.5, "tokens": 10}, "either"),
        ({"ratio": 0.5}, "no parameter"),
    ],
)
def test_bad_params_one_line(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build(NAME, params)
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
def test_budget_above_the_tower_fails_validation_in_one_line():
    with pytest.raises(MethodError, match="tokens=65 exceeds the 64") as e:
        methods.build(NAME, {"tokens": 65}).validate(get_adapter(fresh_model("llava")))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_full_size_meta_count_equals_analytic():
    check_meta_flops(NAME, {"prompt_tokens": 64})
    check_meta_flops(NAME, {"tokens": 192, "important_ratio": 0.75})
