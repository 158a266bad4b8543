"""Equal-budget mapping: one common budget -> each method's own parameters, via analytic FLOPs."""
import pytest

from harness.config import ConfigError, compose_config, validate, validate_against_model
from harness.results import record_key
from harness.config import resolved


def _resolve(*overrides):
    cfg = compose_config(["model=llava15_7b", *overrides])
    return validate_against_model(cfg, validate(cfg))


@pytest.mark.parametrize("method, param", [("fastv", "keep"), ("random", "keep"), ("tome", "tokens"),
                                           ("ficoco_v", "tokens"), ("ficoco_l", "final_tokens")])
def test_token_budget_sets_the_token_parameter(method, param):
    m, _, info = _resolve(f"method={method}", "budget.kind=tokens", "budget.value=0.22")
    assert m.params()[param] == round(0.22 * 576) == info["visual_tokens"]


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
