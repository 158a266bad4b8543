"""Equal-budget mapping: one common budget -> each method's own parameters, via analytic FLOPs."""
import re
from pathlib import Path

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


# ---- the count rule, conflicts with explicit parameters, make eval's cells ----------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("method", sorted(COUNT) + ["shortv_auto", "shortv_fastv"])
@pytest.mark.parametrize("value", ["1.5", "64.25"])
def test_token_count_must_be_whole(method, value):
    """value > 1 is a count of visual tokens: 1.5 was truncated to keep=1 while the record said 1.5."""
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["model=tiny", f"method={method}", "budget.kind=tokens", f"budget.value={value}"]))
    assert str(e.value).startswith(f"budget.value={value}:") and "whole number" in str(e.value)


@pytest.mark.parametrize("method", sorted(COUNT))
def test_token_count_as_a_whole_float_is_the_count(method):
    m = _resolve(f"method={method}", "budget.kind=tokens", "budget.value=64.0")[0]
    assert m.params()[COUNT[method]] == 64 and isinstance(m.params()[COUNT[method]], int)


@pytest.mark.bad_input
@pytest.mark.parametrize("method, param, value, kind", [
    ("fastv", "keep", "10", "tokens"),
    ("fastv", "keep_ratio", "0.5", "tokens"),
    ("fastv", "keep", "10", "flops"),
    ("random", "keep", "10", "tokens"),
    ("random", "keep_ratio", "0.5", "tokens"),
    ("ficoco_l", "final_tokens", "64", "tokens"),
    ("ficoco_l", "final_ratio", "0.5", "tokens"),
    ("tome", "prompt_tokens", "64", "tokens"),
    ("tome", "tokens", "64", "flops"),
    ("ficoco_v", "prompt_tokens", "0.5", "tokens"),
    ("ficoco_vl", "prompt_tokens", "64", "tokens"),
    ("ficoco_vl", "vision_tokens", "300", "tokens"),
    ("shortv", "N", "3", "tokens"),
    ("shortv_auto", "N", "3", "flops"),
    ("redundancylens", "hollow_ratio", "0.3", "tokens"),
    ("shortv_fastv", "members.1.params.keep", "10", "tokens"),
    ("redundancylens_fastv", "members.1.params.keep_ratio", "0.5", "tokens"),
    # parameters a budget makes unused (FastV's R: keep / keep_ratio take precedence)
    ("fastv", "R", "0.3", "tokens"),
    ("fastv", "R", "0.7", "flops"),
    ("shortv_fastv", "members.1.params.R", "0.3", "tokens"),
])
def test_explicit_parameter_the_budget_sets_is_refused(method, param, value, kind):
    """The budget would silently override it while the cell key keeps it (one cell under two keys)."""
    extra = ["method.params.layers=auto"] if method == "shortv" else []
    bv = "0.33" if kind == "tokens" else "0.5"
    with pytest.raises(ConfigError) as e:
        compose_config(["model=tiny", f"method={method}", *extra, f"method.params.{param}={value}",
                        f"budget.kind={kind}", f"budget.value={bv}"])
    msg = str(e.value)
    assert msg.startswith(f"method.params.{param}={value}: conflicts with budget.kind={kind}"), msg
    assert "drop one" in msg and "\n" not in msg


@pytest.mark.parametrize("overrides", [
    ["method=shortv", "method.params.layers=auto", "method.params.N=0"],   # N=0: the budget chooses N
    ["method=shortv_auto"],
    ["method=shortv_auto", "method.params.N=0"],
    ["method=redundancylens", "method.params.hollow_layers=auto", "method.params.ffn_layers=auto"],
    ["method=fastv", "method.params.K=3"],                                  # not a budget parameter
    ["method=fastv", "method.params.keep=null"],                            # the default
    ["method=shortv_fastv", "method.params.members.1.params.K=3"],
    ["method=tome", "method.params.order=spatial"],
    # an inline composition spelling out a member's own default (FastV's R=0.5) sets nothing the budget owns
    ["method=compose", "method.params.members=[{name: shortv, params: {layers: [3, 0]}}, {name: fastv, params: {K: 2, R: 0.5}}]"],
])
def test_parameters_the_budget_does_not_set_are_accepted(overrides):
    cfg = compose_config(["model=tiny", *overrides, "budget.kind=tokens", "budget.value=0.33"])
    validate_against_model(cfg, validate(cfg))


#: the record keys of `make eval`'s cells (EVAL_SETTINGS x EVAL_TOKEN_METHODS, shortv_auto, redundancylens,
#: EVAL_COMPOSITIONS x EVAL_BUDGETS) and the equivalent spelled-out ShortV cells, as before the budget checks;
#: `random` draws per sample since `per_sample` (new keys, one per seed of EVAL_RANDOM_SEEDS), `blind` is new;
#: every key changed with the embedded model and shapes 2.0 (#26), and each has a record in results/store
MAKE_EVAL_KEYS = {
    'method=none model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'a5fcdf9f7b79f7fa',
    'method=random method.params.seed=0 budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'e5a485a134e412c0',
    'method=random method.params.seed=0 budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '81b0f639f769ca58',
    'method=random method.params.seed=0 budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '864983fce82a7f28',
    'method=random method.params.seed=1 budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '13c645ebbfbb5840',
    'method=random method.params.seed=1 budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '0f12ef4b74d39b32',
    'method=random method.params.seed=1 budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '4fdda6ed661b7995',
    'method=random method.params.seed=2 budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'cd2dae6d1661d02c',
    'method=random method.params.seed=2 budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '331b99c434dbee79',
    'method=random method.params.seed=2 budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '4073ca907d8451d7',
    'method=blind model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'c5a89ae868abe803',
    'method=fastv budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '57afab0bdb99edeb',
    'method=fastv budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '64406fb3cd42ad27',
    'method=fastv budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '6e6241ff381ea34d',
    'method=ficoco_l budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'b0abf32959076977',
    'method=ficoco_l budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'a34256c927d3a8b2',
    'method=ficoco_l budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'b1fc4c615029300a',
    'method=tome budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'c1987da0465eeb62',
    'method=tome budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'fd6d5c3a7aecb446',
    'method=tome budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '65a95c0c12013293',
    'method=ficoco_v budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'c43105addb186aa3',
    'method=ficoco_v budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'c3fd02caae950836',
    'method=ficoco_v budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '77ca7369667c6b56',
    'method=ficoco_vl budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '9cb0e21a3c4091c1',
    'method=ficoco_vl budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'ee7742147f5bf8c7',
    'method=ficoco_vl budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '2ea1374239cc8de8',
    'method=shortv_auto budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '62c61d2cca12ec8c',
    'method=shortv_auto budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '8082cc355ceb3445',
    'method=shortv_auto budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '855c92ec5b53bfca',
    'method=redundancylens budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '8cac7de8a1302336',
    'method=redundancylens budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '3809f3b73d8cd0b6',
    'method=redundancylens budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'd4e24b835e17384e',
    'method=shortv_fastv budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '3fdfce32077a565b',
    'method=shortv_fastv budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '52868943a1c082f0',
    'method=shortv_fastv budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '3c08a1573abbbf4d',
    'method=redundancylens_fastv budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '6f6e4950858709b6',
    'method=redundancylens_fastv budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '799bd73fe985b431',
    'method=redundancylens_fastv budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': 'a98677cf5ed8de63',
    'method=shortv method.params.layers=auto method.params.N=0 budget.kind=tokens budget.value=0.33 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '62c61d2cca12ec8c',
    'method=shortv method.params.layers=auto method.params.N=0 budget.kind=tokens budget.value=0.22 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '8082cc355ceb3445',
    'method=shortv method.params.layers=auto method.params.N=0 budget.kind=tokens budget.value=0.125 model=tiny benchmark=shapes run.limit=200 run.batch_size=8': '855c92ec5b53bfca',
}


@pytest.mark.slow  # validates the whole make eval sweep (about 8 s)
def test_make_eval_cells_stay_valid_with_their_keys():
    from harness.sweep import split_sweeps, validate_sweep

    for cell, key in MAKE_EVAL_KEYS.items():
        cfg = compose_config(cell.split())
        validate(cfg)
        assert record_key(resolved(cfg)) == key, cell
        # and the committed default sweep holds that very record (make eval on a fresh clone serves it as is)
        assert (Path(__file__).resolve().parents[1] / "results" / "store" / "records" / f"{key}.json").exists(), cell
    settings = "model=tiny benchmark=shapes run.limit=200 run.batch_size=8".split()
    # every sweep `make eval` runs (its EVAL_SWEEPS, read from the Makefile's variables) validates
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    var = {k: v.strip() for k, v in re.findall(r"^(EVAL_[A-Z_]+) \??= (.*)$", make, flags=re.M)}
    (line,) = re.findall(r"^\t\$\(VTB\) -m (.*)$", make.split("define EVAL_SWEEPS")[1].split("endef")[0], flags=re.M)
    for _ in range(3):  # the grids' variables name the others
        line = re.sub(r"\$\((EVAL_[A-Z_]+)\)", lambda m: var[m.group(1)], line)
    sweeps = split_sweeps(line.replace("$(ARGS)", "").split())
    n = 0
    for sweep in sweeps:
        n += len(validate_sweep(sweep))
    assert len(sweeps) == 3 and n == len(var["EVAL_CONTROLS"].split(",")) + 3 * 3 + 3 * (
        len(var["EVAL_TOKEN_METHODS"].split(",")) + 2 + len(var["EVAL_COMPOSITIONS"].split(",")))
    assert len(validate_sweep(["method=shortv", "method.params.layers=auto", "method.params.N=0", "budget.kind=tokens",
                               "budget.value=0.33,0.22,0.125", *settings])) == 3


@pytest.mark.bad_input
def test_inline_composition_member_parameter_the_budget_makes_unused_is_refused():
    members = "[{name: shortv, params: {layers: [3, 0]}}, {name: fastv, params: {K: 2, R: 0.3}}]"
    with pytest.raises(ConfigError) as e:
        compose_config(["model=tiny", "method=compose", f"method.params.members={members}",
                        "budget.kind=tokens", "budget.value=0.25"])
    assert str(e.value).startswith("method.params.members.1.params.R=0.3: conflicts with budget.kind=tokens")
