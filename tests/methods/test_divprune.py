"""DivPrune at the LLM input (methods/divprune.py) on LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and
Qwen2.5-VL: documented no-op, kept count == budget, cached == uncached, padded batch == single prompts, counted
FLOPs == analytic, both budget kinds, bad input, and agreement with a plain re-implementation of the official
greedy MMDP (loops over the distance matrix, as vbdi/divprune's `DivPrune` does)."""
from __future__ import annotations

import pytest
import torch

import methods
from harness.budget import prompt_count, resolve
from harness.efficiency import flops as F
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods.base import MethodError
from methods.divprune import mmdp_greedy
from tests.methods.helpers import (
    check_batch_equals_single,
    check_flops,
    check_recomputed,
    fresh_model,
    greedy_uncached,
    inputs as prompts,
    llm_visual_tokens,
    processor,
    vision_inputs,
)
from tests.efficiency.helpers import image
from tests.methods.test_families import SIZES, prompt
from tests.methods.test_families import batch as two_image_batch

NAME = "divprune"
MROPE = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]


def applied(family, lm="llama", **params):
    model = fresh_model(family, lm)
    m = methods.build(NAME, params)
    m.apply(model, get_adapter(model))
    return model, m


def other_family(family, **params):
    model, proc = build_tiny(family, gqa=True, vision_layers=3)
    m = methods.build(NAME, params)
    m.apply(model, get_adapter(model))
    return model, proc, m


# ---- the independent reference ---------------------------------------------------------------------------
def reference_mmdp(emb, k):
    """The official greedy, in plain Python: distance 1 - cosine; first the token whose second-smallest
    distance in its column (its nearest other token) is largest; then k-1 times the token whose smallest
    distance to the chosen rows is largest (first index on ties). Sorted indices."""
    n = emb.shape[0]
    unit = [emb[i].float() / emb[i].float().norm() for i in range(n)]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    chosen = []
    for step in range(k):
        best, best_score = None, None
        for j in range(n):
            if step == 0:
                score = sorted(dist[i][j] for i in range(n))[1]
            else:
                score = min(dist[s][j] for s in chosen)
            if j in chosen:
                continue
            if best_score is None or score > best_score:
                best, best_score = j, score
        chosen.append(best)
    return sorted(chosen)


def test_greedy_matches_reference_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    for n, d, k in [(64, 32, 20), (30, 8, 29), (50, 16, 1), (16, 4, 16)]:
        emb = torch.randn(n, d, generator=g)
        assert mmdp_greedy(emb, k).tolist() == reference_mmdp(emb, k)


def test_greedy_is_max_min_on_a_constructed_set():
    """Three tight clusters on orthogonal axes and k=3: one token of each cluster."""
    g = torch.Generator().manual_seed(1)
    axes = torch.eye(3)
    emb = torch.cat([axes[i] + 0.01 * torch.randn(5, 3, generator=g) for i in range(3)])
    assert sorted(i // 5 for i in mmdp_greedy(emb, 3).tolist()) == [0, 1, 2]


def llm_input(model, inp):
    """The unpatched model's LLM input embeddings and position ids (a pre-hook on its language model)."""
    seen = {}

    def hook(_m, args, kwargs):
        seen.update(kwargs)

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inp)
    h.remove()
    return seen["inputs_embeds"], seen.get("position_ids")


@pytest.mark.parametrize("sample, keep, positions", [
    (0, 20, "keep"), (2, 8, "renumber"),
    pytest.param(1, 40, "keep", marks=pytest.mark.slow), pytest.param(1, 40, "renumber", marks=pytest.mark.slow),
])
def test_agrees_with_plain_reference(sample, keep, positions, record_property):
    """LLaVA-1.5: identical kept sets, and the logits of the unpatched language model run on the kept tokens
    (kept positions, or 0..n'-1 renumbered as the official code gets them)."""
    model, m = applied("llava", keep=keep, positions=positions)
    ref_model = fresh_model("llava")
    inp = vision_inputs(processor("llava"), [sample])
    with torch.no_grad():
        logits = model(**inp).logits[:, -1]
    emb, _ = llm_input(ref_model, inp)
    ids = inp["input_ids"][0].tolist()
    vis = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    chosen = reference_mmdp(emb[0, vis], keep)
    assert m._plan.last_selection[0].tolist() == chosen
    kept = [i for i in range(len(ids)) if i not in set(vis)] + [vis[c] for c in chosen]
    kept.sort()
    pos = torch.tensor([kept]) if positions == "keep" else torch.arange(len(kept))[None]
    with torch.no_grad():
        out = ref_model.model.language_model(inputs_embeds=emb[:, kept], position_ids=pos)
        ref_logits = ref_model.lm_head(out.last_hidden_state[:, -1])
    delta = float((logits - ref_logits).abs().max())
    record_property("max_abs_dlogit", delta)
    assert delta < 1e-4, delta


# ---- the shared properties --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_documented_noop_is_identical(family):
    model, proc = fresh_model(family), processor(family)
    inp = vision_inputs(proc, [0, 1], family)
    with torch.no_grad():
        ref = model(**inp).logits
    methods.build(NAME, methods.get(NAME).noop).apply(model, get_adapter(model))
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("value", [0.33, pytest.param(0.125, marks=pytest.mark.slow), 20])
def test_kept_count_equals_budget_on_every_prompt(family, value):
    model, m = applied(family, **m_budget(value))
    proc = processor(family)
    for shape in ([(64, 64)], [(64, 64), (64, 128)], [(128, 64), (64, 64), (96, 80)]):
        if family == "llava":
            shape = [(64, 64)] * len(shape)
        inp = prompts(proc, [shape])
        layout = F.layouts_from_inputs(model, inp)[0]
        got = llm_visual_tokens(model, inp)
        assert got == m.visual_tokens_kept(layout) == prompt_count(value, layout.visual)


def m_budget(value):
    return methods.build(NAME, {}).budget_token_params(value)


@pytest.mark.parametrize("family, params", [
    ("llava", {"keep": 20}),
    ("llava_next", {"keep_ratio": 0.33}),
    pytest.param("llava", {"keep": 7, "positions": "renumber"}, marks=pytest.mark.slow),
    pytest.param("llava_next", {"keep": 7, "positions": "renumber"}, marks=pytest.mark.slow),
])
def test_counted_flops_equal_analytic(family, params):
    model, m = applied(family, **params)
    check_flops(model, m, vision_inputs(processor(family), [1], family))


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_cached_equals_uncached_and_batch_equals_single_llava(positions):
    model, _ = applied("llava", keep=20, positions=positions)
    check_batch_equals_single(model, processor("llava"), "llava")


def test_cached_equals_uncached_next():
    model, _ = applied("llava_next", keep_ratio=0.25)
    proc = processor("llava_next")
    for i in (1, 2):
        check_recomputed(model, vision_inputs(proc, [i], "llava_next"))


@pytest.mark.parametrize("family", MROPE)
def test_other_families(family):
    """Two images of different sizes per prompt: no-op identical, kept count, counted == analytic FLOPs,
    cached == uncached, padded batch == single prompts."""
    model, proc = build_tiny(family, gqa=True, vision_layers=3)
    inp = two_image_batch(proc, ["What is shown?"])
    with torch.no_grad():
        ref = model(**inp).logits
    methods.build(NAME, methods.get(NAME).noop).apply(model, get_adapter(model))
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)

    model, proc, m = other_family(family, keep=4)
    (layout,) = F.layouts_from_inputs(model, inp)
    assert llm_visual_tokens(model, inp) == 4 == m.visual_tokens_kept(layout)
    assert F.count_prefill(model, inp).flops == F.analytic_prefill(model.config, layout, m)
    with torch.no_grad():
        cached = model.generate(**inp, max_new_tokens=4, do_sample=False)[:, inp["input_ids"].shape[1]:]
    assert torch.equal(cached, greedy_uncached(model, inp, 4))
    texts = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]
    both_inp = two_image_batch(proc, texts)
    with torch.no_grad():
        both = model(**both_inp).logits[:, -1]
        for b, t in enumerate(texts):
            one = proc(images=[image(7 * b + i, s) for i, s in enumerate(SIZES)], text=[prompt(proc, 2, t)],
                       return_tensors="pt")
            torch.testing.assert_close(both[b], model(**one).logits[0, -1], rtol=1e-4, atol=1e-4)


# ---- budgets -----------------------------------------------------------------------------------------------
def test_both_budget_kinds_reach_it():
    model = fresh_model("llava")
    adapter = get_adapter(model)
    m, info = resolve(methods.build(NAME, {}), adapter, {"kind": "tokens", "value": 16})
    assert m.keep == 16 and info["visual_tokens_to_llm"] == 16
    m, info = resolve(methods.build(NAME, {}), adapter, {"kind": "tokens", "value": 0.25})
    assert (m.keep, m.keep_ratio) == (None, 0.25) and info["visual_tokens_to_llm"] == 16
    m, info = resolve(methods.build(NAME, {}), adapter, {"kind": "flops", "value": 0.5})
    assert 1 <= m.keep < 64 and abs(info["predicted_flops_ratio"] - 0.5) < 0.05
    dense = sum(F.analytic_prefill(model.config, F.synthetic_layout(model.config)).values())
    priced = sum(F.analytic_prefill(model.config, F.synthetic_layout(model.config), m).values())
    assert priced / dense == pytest.approx(info["predicted_flops_ratio"])


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "params, match",
    [
        ({"keep_ratio": float("nan")}, "method.params.keep_ratio=nan: .*finite"),
        ({"keep_ratio": float("inf")}, "method.params.keep_ratio=inf: .*finite"),
        ({"keep_ratio": 0}, "method.params.keep_ratio=0: .*\\(0, 1\\]"),
        ({"keep_ratio": 1.5}, "method.params.keep_ratio=1.5: .*\\(0, 1\\]"),
        ({"keep_ratio": "most"}, "method.params.keep_ratio=most: .*\\(0, 1\\]"),
        ({"keep_ratio": False}, "method.params.keep_ratio=false: .*\\(0, 1\\]"),
        ({"keep": 0}, "method.params.keep=0: .*>= 1"),
        ({"keep": 3.5}, "method.params.keep=3.5: .*integer"),
        ({"keep": "ten"}, "method.params.keep=ten: .*integer"),
        ({"positions": "shift"}, "method.params.positions=shift: .*'keep' or 'renumber'"),
        ({"seed": 1}, "no parameter"),
    ],
)
def test_bad_params_one_line(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build(NAME, params)
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_renumbered_positions_refused_on_mrope_before_load(family):
    model, _ = build_tiny(family, gqa=True, vision_layers=3)
    with pytest.raises(MethodError, match="M-RoPE") as e:
        methods.build(NAME, {"keep": 4, "positions": "renumber"}).validate(get_adapter(model))
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
def test_keep_above_one_image_fails_validation_in_one_line():
    with pytest.raises(MethodError, match="keep=65 exceeds the 64") as e:
        methods.build(NAME, {"keep": 65}).validate(get_adapter(fresh_model("llava")))
    assert "\n" not in str(e.value)


# ---- the paper's FLOPs convention ---------------------------------------------------------------------------
def test_divprune_convention_reproduces_the_official_script():
    """vtbench-flops convention=divprune: DivPrune's tflops.py formula (4nd^2 + 2n^2d + 2ndm over 32 layers, n =
    text + visual, averaged over its 11 benchmarks) for LLaVA-1.5-7B at the default 0.098: 3.23 -> 0.51 T, 15.6 %,
    recomputed here from the formula with plain arithmetic."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from harness.efficiency import conventions as C
    from harness.models.loading import config_from_cfg

    root = Path(__file__).resolve().parents[2]
    config = config_from_cfg(OmegaConf.load(root / "conf/model/llava15_7b.yaml"))
    d, m, T, v = 4096, 11008, 32, 576
    texts = [15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57]
    macs = lambda n: T * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    kept = v - int(round((1 - 0.098) * v))
    dense = sum(macs(t + v) for t in texts) / len(texts)
    pruned = sum(macs(t + kept) for t in texts) / len(texts)
    ratio = sum(macs(t + kept) / macs(t + v) for t in texts) / len(texts)
    method = methods.build(NAME, {"keep_ratio": 0.098})
    got = C.evaluate("divprune", config, method=method)
    assert got["total"] == pytest.approx(pruned) and got["paper_ratio"] == pytest.approx(ratio)
    assert C.evaluate("divprune", config)["total"] == pytest.approx(dense)
    assert (round(dense / 1e12, 2), round(pruned / 1e12, 2), round(100 * ratio, 1)) == (3.23, 0.51, 15.6)
