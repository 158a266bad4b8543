"""FiCoCo-VL = FiCoCo-V (vision encoder) + FiCoCo-L (LLM) (methods/ficoco_vl.py)."""
from __future__ import annotations

import contextlib
import sys
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

sys.path.insert(0, str(Path(__file__).parent))
from test_vision_reduce import (  # noqa: E402
    check_batch_equals_single,
    check_decode_consistency,
    check_flops,
    make_inputs,
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


@pytest.mark.parametrize("params", [{"tokens": None}, {"tokens": 64}])
def test_noop_is_identical(params):
    model, proc = _build()
    inputs = make_inputs(proc, [0, 1])
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


@pytest.mark.parametrize(
    "params, match",
    [
        ({"tokens": 0}, "positive"),
        ({"vision_share": 2}, "vision_share"),
        ({"tokens": 20, "vision_tokens": 10}, ">= tokens"),
        ({"vision_params": {"tokens": 3}}, "vision_params.tokens"),
        ({"llm_params": {"final_tokens": 3}}, "llm_params.final_tokens"),
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


def test_llava_next_not_applicable():
    model, _ = _build("llava_next")
    with pytest.raises(MethodError, match="not applicable"):
        methods.build("ficoco_vl", {**STAGES, "tokens": 20}).validate(get_adapter(model))


def test_flops_counted_equal_analytic():
    model, proc = _build("llava", "qwen2", gqa=True)
    m = _apply(model, tokens=20)
    check_flops(model, m, make_inputs(proc, [1]))


def _pin(removed):
    """Uncached recomputation: FiCoCo-L scores against the (shrunk) prompt, as in the cached prefill."""

    @contextlib.contextmanager
    def ctx(inputs):
        model = ctx.model
        LR.pin_prompt_length(model, inputs["input_ids"].shape[1] - removed)
        try:
            yield
        finally:
            LR.pin_prompt_length(model, None)

    return ctx


@pytest.mark.slow
@pytest.mark.parametrize("lm, gqa", [("llama", False), ("qwen2", True)])
def test_decode_consistency_and_batch(lm, gqa):
    model, proc = _build("llava", lm, gqa)
    _apply(model, tokens=20)  # 64 -> 42 in CLIP, 42 -> 20 in the LLM
    pin = _pin(64 - 42)
    pin.model = model
    check_decode_consistency(model, make_inputs(proc, [1]), recompute_ctx=pin)
    check_batch_equals_single(model, proc, recompute_ctx=pin)
