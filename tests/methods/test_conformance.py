"""The conformance suite: every registered method, on every family it declares, and every preset in
conf/method/, held to the shared properties (the checks and the hooks each needs:
tests/methods/conformance.py; README "Add a method"). The parametrisation reads the registry, so a new
method is covered without editing any list here:

    pytest -k conformance                  # everything
    pytest -k "conformance and stride"     # one method

Method-specific tests (independent references, paper numbers) stay in each method's own test file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import methods
from tests.methods import conformance as C

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


def _per_family(predicate=lambda cls: True):
    out = []
    for name in C.registered():
        cls = methods.get(name)
        if predicate(cls):
            out += [pytest.param(name, f, id=f"{name}-{f}") for f in cls.families]
    return out


NAMES = [pytest.param(n, id=n) for n in C.registered()]
PER_FAMILY = _per_family()
BUDGET = [pytest.param(n, f, id=f"{n}-{f}") for n in C.registered() for f in C.budget_families(n)]


@pytest.mark.parametrize("name, family", _per_family(lambda cls: cls.noop is not None))
def test_conformance_noop_equals_unpatched(name, family):
    C.check_noop(name, family)


@pytest.mark.parametrize("name, family", PER_FAMILY)
def test_conformance_cached_equals_uncached(name, family):
    C.check_cache(name, family)


@pytest.mark.parametrize("name, family", PER_FAMILY)
def test_conformance_batch_equals_single(name, family):
    C.check_batch(name, family)


#: fvcore's traced count costs 2-7 s per model on the tiny models: LLaVA-1.5 (every method acts on it) runs
#: in `make test`, the other families with the slow tests (`make test-slow`, CI)
FLOPS = [pytest.param(*p.values, id=p.id, marks=[] if p.values[1] == "llava" else [pytest.mark.slow])
         for p in PER_FAMILY]


@pytest.mark.parametrize("name, family", FLOPS)
def test_conformance_counted_flops_equal_analytic(name, family):
    C.check_flops(name, family)


@pytest.mark.parametrize("name, family", PER_FAMILY)
def test_conformance_visual_tokens_reported(name, family):
    C.check_kept(name, family)


@pytest.mark.parametrize("name", NAMES)
def test_conformance_meta_countable_flag(name):
    C.check_meta(name, methods.get(name).families[0])


@pytest.mark.parametrize("name, family", BUDGET)
def test_conformance_budget_rule_per_prompt(name, family):
    C.check_budget(name, family)


@pytest.mark.bad_input
@pytest.mark.parametrize("name", NAMES)
def test_conformance_bad_parameters_one_line(name):
    C.check_bad_params(name)


@pytest.mark.parametrize("name", NAMES)
def test_conformance_families_declared_supported_refused(name):
    C.check_families(name)


@pytest.mark.parametrize("name", NAMES)
def test_conformance_declares_example_or_noop_and_has_a_config(name):
    """Every method declares its no-op or example (the suite runs it with them), and has its YAML (the
    Hydra group `method=<name>` the README and sweeps use) whose parameters build."""
    which, params = C.settings(name)
    assert params is not None
    path = CONF / f"{name}.yaml"
    assert path.is_file(), f"{name}: no conf/method/{name}.yaml (method={name} on the command line needs it)"
    conf = yaml.safe_load(path.read_text())
    assert conf.get("name") == name
    try:
        methods.build(name, conf.get("params") or {})
    except methods.MethodError as e:  # required parameters left to the user: one line
        C._one_line(e)


#: presets whose calibration + counting takes > 10 s (RedundancyLens' greedy ranking, twice) run with the slow tests
_SLOW_PRESETS = {"redundancylens_fastv"}
PRESETS = [pytest.param(p, id=p, marks=[pytest.mark.slow] if p in _SLOW_PRESETS else [])
           for p in sorted(p.stem for p in CONF.glob("*.yaml") if yaml.safe_load(p.read_text()).get("name") != p.stem)]


@pytest.mark.parametrize("preset", PRESETS)
def test_conformance_preset(preset, tmp_path, monkeypatch):
    """Every preset (a conf/method/*.yaml naming another method), with the embedded tiny model's
    conf/model_method/tiny_<preset>.yaml on top as `model=tiny` would put it: it names a registered method;
    its parameters build or are refused in one line; its 'auto' layers are calibrated as vtbench calibrates
    them (`harness.calibration.resolve_auto`, on the suite's prompts, an 8-layer tiny LLM); then it either
    is refused in one line or passes the run checks (counted FLOPs == analytic, visual tokens reported,
    cached == uncached) on LLaVA, and validates or is refused in one line on every family it declares."""
    from omegaconf import OmegaConf

    from harness import calibration as HC
    from harness.models import get_adapter

    conf = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    name = conf["name"]
    assert name in C.registered(), f"preset {preset}: unknown method {name!r}"
    params = OmegaConf.create({"params": conf.get("params") or {}})
    override = CONF.parent / "model_method" / f"tiny_{preset}.yaml"
    if override.is_file():
        params = OmegaConf.merge(params, OmegaConf.load(override))
    params = OmegaConf.to_container(params, resolve=True)["params"]
    try:
        m = methods.build(name, params)
    except methods.MethodError as e:
        C._one_line(e)
        return
    for family in methods.get(name).families:
        try:
            m.validate(get_adapter(C.tiny(family)[0]))
        except methods.MethodError as e:
            C._one_line(e)
    family = "llava"
    model, proc = C.tiny(family, num_layers=8)
    adapter = get_adapter(model)
    monkeypatch.setattr(HC, "calibration_batches", lambda cfg, model, processor: ([C.prompts(family, 2)], "conformance", 2))
    monkeypatch.setattr(HC, "_model_id", lambda cfg: "tiny-conformance")
    cfg = OmegaConf.create({"calibration": {"seed": 0, "dir": str(tmp_path), "tail": 0, "alpha": 2.0}})
    try:
        m, _ = HC.resolve_auto(cfg, m, model, proc, adapter)
        m.validate(adapter)
    except methods.MethodError as e:
        print(f"[conformance] preset {preset} refused: {C._one_line(e)}")
        return
    m.apply(model, adapter)
    with C.use_preset(name, (model, proc, m)):
        C.check_flops(name, family)
        C.check_kept(name, family)
        C.check_cache(name, family)


def test_conformance_flops_cli_prints_what_the_method_reports():
    """`vtbench-flops` prints `Method.visual_tokens_kept` of its prompt (the suite's token check runs that
    prompt through every patched model): for `stride` on the embedded tiny model, 48 of 144 (not all 144,
    which a method without the hook would show)."""
    from harness.efficiency.flops_table import compute, render_table

    r = compute(["model=tiny", "method=stride", "method.params.stride=3"], text_tokens=16)
    assert r["visual_tokens_to_llm"] == 48 and r["layout"]["visual"] == 144
    assert "48 visual tokens reach the LLM" in render_table(r)
