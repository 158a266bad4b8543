"""Equal-budget mapping: one common budget -> each method's own parameters, via analytic FLOPs."""
import pytest

from harness.config import ConfigError, compose_config, validate, validate_against_model
from harness.results import record_key
from harness.config import resolved


def _resolve(*overrides):
    cfg = compose_config(["model=llava15_7b", *overrides])
    return validate_against_model(cfg, validate(cfg))


SHARE = {"fastv": "keep_ratio", "random": "keep_ratio", "tome": "prompt_tokens", "ficoco_v": "prompt_tokens",
         "ficoco_l": "final_ratio", "ficoco_vl": "prompt_tokens"}
COUNT = {"fastv": "keep", "random": "keep", "tome": "prompt_tokens", "ficoco_v": "prompt_tokens",
         "ficoco_l": "final_tokens", "ficoco_vl": "prompt_tokens"}


@pytest.mark.parametrize("method", sorted(SHARE))
@pytest.mark.parametrize("value", ["0.22", "128"])
def test_token_budget_sets_a_per_prompt_parameter(method, value):
    """A share stays a share of each prompt's visual tokens, a count a count per prompt; on the reference
    prompt every token method delivers the same count."""
    m, _, info = _resolve(f"method={method}", "budget.kind=tokens", f"budget.value={value}")
    param = (SHARE if "." in value else COUNT)[method]
    assert m.params()[param] == (float(value) if "." in value else int(value))
    assert info["visual_tokens"] == info["visual_tokens_to_llm"] == (round(0.22 * 576) if "." in value else 128)


@pytest.mark.parametrize("model", ["llava15_7b", "llava_next_7b"])
def test_token_budget_counts_the_whole_prompt(model):
    """LLaVA-NeXT's reference prompt (672x672: 5 crops, newlines): the budget is a share of all its visual
    tokens; vision-side methods are within one token per crop of the others."""
    out = {}
    for method in SHARE:
        cfg = compose_config([f"model={model}", f"method={method}", "budget.kind=tokens", "budget.value=0.22"])
        m, adapter, info = validate_against_model(cfg, validate(cfg))
        out[method] = info["visual_tokens_to_llm"]
    from harness.budget import layout_for
    layout = layout_for(adapter, 64)
    exact = round(0.22 * layout.visual)
    assert out["fastv"] == out["random"] == out["ficoco_l"] == out["ficoco_vl"] == exact
    assert all(abs(out[m] - exact) <= max(1, layout.images // 2) for m in ("tome", "ficoco_v")), out


@pytest.mark.parametrize("method", ["fastv", "tome", "ficoco_v", "random"])
def test_flops_budget_is_met_to_within_one_token(method):
    m, adapter, info = _resolve(f"method={method}", "budget.kind=flops", "budget.value=0.4")
    assert abs(info["predicted_flops_ratio"] - 0.4) < 0.005
    # the analytic price of the chosen setting is what the info says
    from harness.budget import _total, layout_for
    layout = layout_for(adapter, 64)
    assert abs(_total(adapter.model.config, layout, m) / _total(adapter.model.config, layout, None)
               - info["predicted_flops_ratio"]) < 1e-12


def test_budget_is_part_of_the_record_key():
    a = record_key(resolved(compose_config(["method=fastv", "budget.kind=tokens", "budget.value=0.33"])))
    b = record_key(resolved(compose_config(["method=fastv", "budget.kind=tokens", "budget.value=0.11"])))
    c = record_key(resolved(compose_config(["method=fastv"])))
    assert len({a, b, c}) == 3


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    (["method=fastv", "budget.kind=tokens", "budget.value=600"], "exceeds the 576 visual tokens"),
    (["method=fastv", "budget.kind=flops", "budget.value=1.5"], "ratio in (0, 1]"),
    (["method=fastv", "budget.kind=pixels", "budget.value=0.5"], "budget.kind must be"),
    (["method=none", "budget.kind=tokens", "budget.value=0.5"], "method none has no budget"),
])
def test_impossible_budgets_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        _resolve(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
