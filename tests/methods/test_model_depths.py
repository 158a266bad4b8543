"""Defaults and no-ops on every model depth, and models whose attention the methods do not follow.

* every method's default parameters (conf/method/*.yaml) are either valid on a language model of any
  depth (the patched model then runs) or refused with a one-line MethodError;
* a documented no-op is a no-op on every depth (logits equal the unpatched model's);
* a language model with sliding-window attention is refused in one line by every method that changes
  LLM layers; vision-side methods and `none` run on it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from tests.efficiency.helpers import inputs_for
from tests.methods import helpers as S

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"

def defaults(name):
    return dict(yaml.safe_load((CONF / f"{name}.yaml").read_text()).get("params") or {})


def _model(num_layers, vision_layers=3, lm="llama"):
    return build_tiny("llava", lm, num_layers=num_layers, vision_layers=vision_layers)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.mark.parametrize("num_layers", [1, 2, 4])
@pytest.mark.parametrize("name", S.ALL_METHODS)
def test_defaults_valid_or_refused_in_one_line(name, num_layers):
    model, proc = _model(num_layers)
    m = methods.build(name, defaults(name))
    try:
        m.apply(model, get_adapter(model))
    except methods.MethodError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert torch.isfinite(_logits(model, inputs_for(proc))).all()


@pytest.mark.parametrize("num_layers", [1, 2, 4])
@pytest.mark.parametrize("name", [n for n in methods.available() if methods.get(n).noop is not None])
def test_documented_noop_is_a_noop_on_every_depth(name, num_layers):
    """`Method.noop` (the conformance contract; every registered method that has one) on 1-, 2- and
    4-layer language models, on top of the method's YAML defaults."""
    model, proc = _model(num_layers)
    inputs = inputs_for(proc)
    ref = _logits(model, inputs)
    methods.build(name, dict(defaults(name), **methods.get(name).noop)).apply(model, get_adapter(model))
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("lm", ["mistral", "qwen2"])
@pytest.mark.parametrize("name", S.ALL_METHODS)
def test_sliding_window_models_are_followed_or_refused(name, lm):
    model = S.fresh_model("llava", lm)
    tc = model.config.text_config
    tc.sliding_window = 8  # shorter than every prompt
    if lm == "qwen2":
        tc.use_sliding_window = True
        tc.layer_types = ["full_attention", "sliding_attention"] * (tc.num_hidden_layers // 2)
    m = S.method_at(name, budget=0.3 if name in S.TOKEN_METHODS else None)
    acts_in_llm = name not in ("none", "tome", "ficoco_v")
    if acts_in_llm:  # refused before any weights are needed (validate runs on a meta copy) and at apply
        for step in (m.validate, lambda ad: m.apply(model, ad)):
            with pytest.raises(methods.MethodError, match="sliding-window") as e:
                step(get_adapter(model))
            assert "\n" not in str(e.value)
    else:
        m.apply(model, get_adapter(model))
