"""`random`: no-op identity, seeded and batch-independent subset, cached == uncached greedy decoding
(batch 1 and left-padded batch 4; Llama/Mistral/Qwen2 incl. GQA), counted FLOPs == analytic, errors,
the shipped config."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness.efficiency.flops import analytic_prefill, count_prefill, layouts_from_inputs
from harness.models.adapter import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from methods.random_drop import random_subset
from tests.methods.helpers import check_decode_consistency, forward, make_inputs, tiny

ROOT = Path(__file__).resolve().parents[2]


def apply(model, **params):
    m = methods.build("random", params)
    return m.apply(model, get_adapter(model)), m


def test_noop_identical_logits():
    base, proc = tiny("llava", "qwen2", gqa=True)
    inp = make_inputs(proc, (0, 1, 2, 3))
    for params in ({"keep_ratio": 1.0}, {"keep": 64}):
        model, _ = apply(copy.deepcopy(base), **params)
        assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)


def test_seeded_subset_same_for_every_sample():
    """per_sample=false (the earlier behaviour): one subset from the seed alone, at the same relative
    positions in every sample (the per-sample default is tested in test_random_per_sample.py)."""
    assert torch.equal(random_subset(64, 10, 3), random_subset(64, 10, 3))
    assert not torch.equal(random_subset(64, 10, 3), random_subset(64, 10, 4))
    model, proc = tiny("llava", "llama")
    apply(model, keep=10, seed=3, per_sample=False)
    inp = make_inputs(proc, (0, 1, 2))
    out = forward(model, inp, use_cache=True)
    assert get_context(model).visual_tokens_per_layer == [10, 10, 10, 10]
    visual = inp["input_ids"] == model.config.image_token_id
    kept = LR.get_reducer(model).state.cache_idx[0]
    for b in range(3):
        vis_pos = visual[b].nonzero().flatten()
        kept_vis = [int(i) for i in kept[b] if visual[b, i]]
        ordinals = [int((vis_pos == i).nonzero()) for i in kept_vis]
        assert ordinals == random_subset(64, 10, 3).tolist()
    P = inp["input_ids"].shape[1]
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P - 54] * 4


@pytest.mark.slow
@pytest.mark.parametrize("lm,gqa,positions", [("llama", False, "keep"), ("mistral", True, "renumber"),
                                              ("qwen2", True, "keep")])
def test_cached_equals_uncached(lm, gqa, positions):
    model, proc = tiny("llava", lm, gqa=gqa)
    apply(model, keep_ratio=0.25, positions=positions)
    check_decode_consistency(model, proc, steps=3)


@pytest.mark.slow
def test_cached_equals_uncached_llava_next():
    model, proc = tiny("llava_next", "mistral", gqa=True)
    apply(model, keep_ratio=0.5)
    check_decode_consistency(model, proc, steps=2, size=(128, 64))


@pytest.mark.parametrize("params", [{"keep_ratio": 0.1}, {"keep": 33, "positions": "renumber"}])
def test_counted_flops_equal_analytic(params):
    model, proc = tiny("llava", "mistral", gqa=True)
    _, method = apply(model, **params)
    inp = make_inputs(proc, (2,))
    layout = layouts_from_inputs(model, inp)[0]
    counted = count_prefill(model, inp).flops
    assert counted == analytic_prefill(model.config, layout, method)


@pytest.mark.parametrize(
    "params,match",
    [({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"), ({"keep_ratio": 1.5}, "keep_ratio must be"),
     ({"keep": -2}, "keep must be an integer >= 1"), ({"seed": "a"}, "seed must be an integer"),
     ({"positions": "x"}, "positions must be"), ({"per_sample": 1}, "per_sample must be true or false")],
)
def test_bad_params(params, match):
    with pytest.raises(MethodError, match=match):
        methods.build("random", params)


def test_validate_keep_exceeds_visual_tokens():
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match="exceeds the 64 visual tokens"):
        methods.build("random", {"keep": 100}).validate(get_adapter(model))


def test_config_file_builds():
    cfg = yaml.safe_load((ROOT / "conf/method/random.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert (m.name, m.keep_ratio, m.seed, m.per_sample) == ("random", 0.1, 0, True)


# ---- ranges: seeds in [0, 2^32-1], keep >= 1, errors led by the key --------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("param, value", [("seed", -1), ("seed", 2**32), ("seed", 2.5), ("seed", True),
                                          ("keep", 0), ("keep", -3), ("keep", 2.5), ("keep", True)])
def test_integer_parameters_out_of_range_are_named(param, value):
    import methods
    from methods.base import MethodError

    with pytest.raises(MethodError) as e:
        methods.build("random", {param: value})
    assert str(e.value).startswith(f"method.params.{param}={methods.show(value)}: random: "), str(e.value)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_range_ends_are_valid(seed):
    import methods

    assert methods.build("random", {"seed": seed, "keep": 1}).seed == seed


# ---- random dropping at any decoder layer (`layer`) ----------------------------------------------------
def test_drop_at_a_later_layer_schedule_cache_and_flops():
    model, proc = tiny("llava", "llama", gqa=True)
    _, m = apply(model, keep=10, layer=2, seed=5, per_sample=False)
    inp = make_inputs(proc, (0, 1, 2))
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    assert get_context(model).visual_tokens_per_layer == [64, 64, 10, 10]
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P, P, P - 54, P - 54]
    visual = inp["input_ids"] == model.config.image_token_id
    kept = LR.get_reducer(model).state.cache_idx[2]
    for b in range(3):  # the same seeded subset, now chosen at layer 2
        vis_pos = visual[b].nonzero().flatten().tolist()
        assert [vis_pos.index(int(i)) for i in kept[b] if visual[b, i]] == random_subset(64, 10, 5).tolist()
    one = make_inputs(proc, (1,))
    layout = layouts_from_inputs(model, one)[0]
    assert count_prefill(model, one).flops == analytic_prefill(model.config, layout, m)


def test_later_layer_cached_equals_uncached_and_batch_equals_single():
    model, proc = tiny("llava", "qwen2", gqa=True)
    apply(model, keep_ratio=0.25, layer=3)
    check_decode_consistency(model, proc, steps=2)


def test_layer_zero_is_the_earlier_method_with_the_same_cell_key():
    """`layer` came later: at 0 it is left out of `params()` and of the cell key, so the records of existing
    `random` cells keep their keys; any other layer is a new cell."""
    from omegaconf import OmegaConf

    from harness.config import compose_config
    from harness.results import record_key

    assert "layer" not in methods.build("random", {"layer": 0}).params()
    assert methods.build("random", {"layer": 2}).params()["layer"] == 2
    cfg = OmegaConf.to_container(compose_config(["method=random"]), resolve=True)
    assert cfg["method"]["params"]["layer"] == 0
    before = {k: v for k, v in cfg["method"]["params"].items() if k != "layer"}  # the config as it was
    old = dict(cfg, method=dict(cfg["method"], params=before))
    assert record_key(cfg) == record_key(old)
    later = OmegaConf.to_container(compose_config(["method=random", "method.params.layer=2"]), resolve=True)
    assert record_key(later) != record_key(cfg)


def test_per_sample_enters_the_cell_key_even_when_a_config_leaves_it_out():
    """The per-sample subset changed `random`'s behaviour: a config that does not spell `per_sample` out (a
    composition member, an old config) keys as `per_sample: true`, never as the earlier one-subset cells."""
    from omegaconf import OmegaConf

    from harness.config import compose_config
    from harness.results import record_key

    cfg = OmegaConf.to_container(compose_config(["method=random"]), resolve=True)
    assert cfg["method"]["params"]["per_sample"] is True

    def with_params(c, **change):
        params = {k: v for k, v in c["method"]["params"].items() if k != "per_sample"}
        params.update(change)
        return dict(c, method=dict(c["method"], params=params))

    assert record_key(with_params(cfg)) == record_key(cfg)
    assert record_key(with_params(cfg, per_sample=False)) != record_key(cfg)
    member = {"name": "random", "params": {"keep_ratio": 0.5, "seed": 0, "positions": "keep"}}
    comp = OmegaConf.to_container(compose_config(["method=compose"]), resolve=True)
    implicit = dict(comp, method={"name": "compose", "params": {"members": [member]}})
    explicit = dict(comp, method={"name": "compose", "params": {"members": [
        dict(member, params=dict(member["params"], per_sample=True))]}})
    legacy = dict(comp, method={"name": "compose", "params": {"members": [
        dict(member, params=dict(member["params"], per_sample=False))]}})
    assert record_key(implicit) == record_key(explicit) != record_key(legacy)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [-1, 1.5, True, "two", float("nan"), float("inf")])
def test_bad_layer_one_line_naming_the_key(value):
    with pytest.raises(MethodError) as e:
        methods.build("random", {"layer": value})
    assert str(e.value).startswith("method.params.layer="), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
def test_layer_beyond_the_model_is_refused():
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match="must be < the number of LLM layers") as e:
        methods.build("random", {"layer": 4, "keep": 8}).validate(get_adapter(model))
    assert "\n" not in str(e.value)
