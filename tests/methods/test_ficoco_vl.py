"""FiCoCo-VL = FiCoCo-V (vision encoder) + FiCoCo-L (LLM) (methods/ficoco_vl.py), LLaVA-1.5 and LLaVA-NeXT."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from methods.ficoco_l import merge_schedule
from tests.methods.helpers import (
    check_batch_equals_single,
    check_recomputed as check_decode_consistency,
    check_flops,
    vision_inputs as make_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"vision_params": {"start_layer": 1}, "llm_params": {"start_layer": 1}}


def _build(family="llava", lm="llama", gqa=False):
    return build_tiny(family, lm, gqa=gqa, vision_layers=4)


def _apply(model, **params):
    m = methods.build("ficoco_vl", {**STAGES, **params})
    m.apply(model, get_adapter(model))
    return m


def test_config_file_builds():
    cfg = yaml.safe_load((ROOT / "conf/method/ficoco_vl.yaml").read_text())
    assert methods.build(cfg["name"], cfg["params"]).tokens is None


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("params", [{"tokens": None}, {"tokens": 64}])
def test_noop_is_identical(params, family):
    model, proc = _build(family)
    inputs = make_inputs(proc, [0, 1], family)
    with torch.no_grad():
        ref = model(**inputs).logits
    _apply(model, **params)
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("params, first", [({"tokens": 20}, 42), ({"tokens": 20, "vision_tokens": 30}, 30),
                                           ({"tokens": 20, "vision_share": 1.0}, 20)])
def test_budget_split(params, first):
    model, proc = _build()
    m = _apply(model, **params)
    assert m.visual_tokens_to_llm(64) == first
    with torch.no_grad():
        model(**make_inputs(proc, [1]))
    per_layer = get_context(model).visual_tokens_per_layer  # at each LLM layer's input
    sched = merge_schedule(first, [1, 2, 3], 0, None, 20) if first > 20 else {}
    assert per_layer[0] == first and per_layer[-1] - sched.get(3, 0) == 20


def _llm_counts(model, inputs):
    """(visual tokens entering the LLM, visual tokens leaving its last layer) in one prefill."""
    adapter = get_adapter(model)
    seen = {}
    hook = adapter.language_model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("n", a[0].shape[1]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    ctx = get_context(model)
    n_in = int(ctx.visual_mask.sum(-1)[0])
    return n_in, n_in - (ctx.visual_mask.shape[1] - seen["n"])


@pytest.mark.parametrize(
    "params, vt",
    [({"tokens": 20}, 42), ({"tokens": 20, "vision_tokens": 30}, 30), ({"tokens": 20, "vision_share": 1.0}, 20),
     ({"tokens": 20, "vision_share": 0.0}, 64)],
)
def test_budget_llava_next(params, vt):
    """NeXT: every crop leaves CLIP with vt tokens (packed crops*vt + 1 newline), and the LLM keeps the
    fraction tokens / vt of what it receives."""
    from methods.ficoco_l import ratio_final_tokens

    model, proc = _build("llava_next")
    m = _apply(model, **params)
    inputs = make_inputs(proc, [1], "llava_next")
    crops = inputs["pixel_values"].shape[1]
    n_in, n_out = _llm_counts(model, inputs)
    if vt < 64:
        assert n_in == crops * vt + 1
    else:  # no vision-side reduction: the model's own anyres packing (unpadded rows + newlines)
        assert n_in == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_out == (ratio_final_tokens(n_in, 20 / vt) if vt > 20 else n_in)
    if vt > 20:
        assert m._l.final_ratio == 20 / vt and m._l.final_tokens is None
        per_layer = get_context(model).visual_tokens_per_layer
        assert per_layer[0] == n_in and per_layer[-1] > n_out


def test_llava_keeps_final_tokens():
    """LLaVA-1.5 (one crop, no newline): the LLM stage is FiCoCo-L with final_tokens = tokens, as before."""
    model, proc = _build()
    m = _apply(model, tokens=20)
    assert m._l.final_tokens == 20 and m._l.final_ratio is None
    assert _llm_counts(model, make_inputs(proc, [1])) == (42, 20)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": 0}, "positive"),
        ({"vision_share": 2}, "vision_share"),
        ({"tokens": 20, "vision_tokens": 10}, ">= tokens"),
        ({"vision_params": {"tokens": 3}}, "vision_params.tokens"),
        ({"llm_params": {"final_tokens": 3}}, "llm_params.final_tokens"),
        ({"llm_params": {"final_ratio": 0.5}}, "llm_params.final_ratio"),
        ({"llm_params": {"beta": 3}}, "beta"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build("ficoco_vl", params)
    assert "\n" not in str(e.value)


def test_validate_errors():
    model, _ = _build()
    with pytest.raises(MethodError, match="exceeds"):
        methods.build("ficoco_vl", {**STAGES, "tokens": 65}).validate(get_adapter(model))
    with pytest.raises(MethodError, match="start_layer"):
        methods.build("ficoco_vl", {"tokens": 20}).validate(get_adapter(model))  # paper layer 12 > 2


def test_validate_errors_llava_next():
    model, _ = _build("llava_next")
    with pytest.raises(MethodError, match="exceeds the 64 visual tokens per crop") as e:
        methods.build("ficoco_vl", {**STAGES, "tokens": 65}).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "family, params",
    [("llava", {"tokens": 20}), ("llava_next", {"tokens": 20}), ("llava_next", {"tokens": 20, "vision_share": 0.0}),
     ("llava_next", {"tokens": 20, "llm_params": {"start_layer": 1, "variant": "code"}})],
)
def test_flops_counted_equal_analytic(family, params):
    model, proc = _build(family, "qwen2", gqa=True)
    m = _apply(model, **params)
    check_flops(model, m, make_inputs(proc, [1], family))


def _pin(model, per_image):
    """Uncached recomputation: FiCoCo-L scores against the (shrunk) prompt, as in the cached prefill.
    `per_image`: visual tokens one image gives the LLM after the vision stage (the placeholder run is
    shrunk to it and samples are re-left-padded)."""

    @contextlib.contextmanager
    def ctx(inputs):
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        n_img = (ids == model.config.image_token_id).sum(1)
        LR.pin_prompt_length(model, int((am.sum(1) - n_img).max()) + per_image)
        try:
            yield
        finally:
            LR.pin_prompt_length(model, None)

    return ctx


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, lm, gqa",
    [("llava", "llama", False), ("llava", "qwen2", True), ("llava_next", "llama", False),
     ("llava_next", "mistral", True)],
)
def test_decode_consistency_and_batch(family, lm, gqa):
    model, proc = _build(family, lm, gqa)
    _apply(model, tokens=20)  # 64 -> 42 per crop in CLIP; the LLM keeps 20/42 of what it receives
    crops = make_inputs(proc, [1], family)["pixel_values"].shape[1] if family == "llava_next" else 1
    pin = _pin(model, crops * 42 + (family == "llava_next"))
    check_decode_consistency(model, make_inputs(proc, [1], family), recompute_ctx=pin)
    check_batch_equals_single(model, proc, family, recompute_ctx=pin)
