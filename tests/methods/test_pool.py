"""`pool` (methods/pool.py): the pooled cells against a deliberately plain loop reference, the patched model's
logits against the unpatched model fed the reference's pooled tokens, the documented no-op, the kept count on
every sample, counted FLOPs == analytic, cached == uncached, padded batch == single prompts, the families it
refuses, bad parameters (one line, exit 2, before the model loads)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness.budget import prompt_count
from harness.efficiency import flops as F
from harness.models import get_adapter
from methods._shared.grid import pool_cells, pool_grid
from methods.base import MethodError
from tests.methods.helpers import (
    check_batch_equals_single,
    check_flops,
    fresh_model,
    llm_visual_tokens,
    processor,
    vision_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
SIDE = 8  # tiny CLIP: 64x64 pixels, 8x8 patches -> 64 visual tokens per crop


# ---- the plain reference ---------------------------------------------------------------------------------
def plain_cells(k: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """The documented rule written out with loops: `round(sqrt(k h / w))` bands of rows (at least ceil(k/w), at
    most h and k), band i holding floor((i+1)k/bands) - floor(ik/bands) cells; adaptive bins on both sides."""
    bands = int(round(math.sqrt(k * h / w)))
    if bands < math.ceil(k / w):
        bands = math.ceil(k / w)
    if bands < 1:
        bands = 1
    if bands > h:
        bands = h
    if bands > k:
        bands = k
    cells = []
    for i in range(bands):
        r0, r1 = (i * h) // bands, math.ceil((i + 1) * h / bands)
        n = ((i + 1) * k) // bands - (i * k) // bands
        for j in range(n):
            c0, c1 = (j * w) // n, math.ceil((j + 1) * w / n)
            cells.append((r0, r1, c0, c1))
    return cells


def plain_pool(feats: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """feats [h*w, D] -> [k, D]: each cell's mean, summed token by token."""
    out = []
    for r0, r1, c0, c1 in plain_cells(k, h, w):
        acc = torch.zeros(feats.shape[1], dtype=torch.float64)
        for r in range(r0, r1):
            for c in range(c0, c1):
                acc += feats[r * w + c].double()
        out.append(acc / ((r1 - r0) * (c1 - c0)))
    return torch.stack(out).to(feats.dtype)


@pytest.mark.parametrize("h, w", [(8, 8), (24, 24), (6, 9)])
def test_cells_follow_the_rule_and_cover_the_grid(h, w):
    ks = range(1, h * w + 1) if h * w <= 64 else [*range(1, 80), 127, 128, 190, 191, 192, 575, 576]
    for k in ks:
        cells = pool_cells(k, h, w)
        assert cells == plain_cells(k, h, w), k
        assert len(cells) == k
        covered = torch.zeros(h, w, dtype=torch.bool)
        for r0, r1, c0, c1 in cells:
            assert r1 > r0 and c1 > c0
            covered[r0:r1, c0:c1] = True
        assert bool(covered.all()), k


@pytest.mark.parametrize("k", [1, 2, 9, 16, 21, 37, 63, 64])
def test_pool_grid_equals_the_loop_reference(k):
    torch.manual_seed(k)
    x = torch.randn(2, SIDE * SIDE, 5)
    out = pool_grid(x, SIDE, SIDE, k)
    assert out.shape == (2, k, 5)
    for n in range(2):
        torch.testing.assert_close(out[n], plain_pool(x[n], k, SIDE, SIDE), rtol=1e-6, atol=1e-6)
    if k == 64:
        assert torch.equal(out, x)  # one token per cell


def test_rectangular_counts_are_adaptive_pooling():
    """g^2 (and any rows x cols the rule picks) is exactly `adaptive_avg_pool2d`: 576 -> 64 is 3x3 averaging."""
    x = torch.randn(1, 576, 4)
    grid = x.transpose(1, 2).reshape(1, 4, 24, 24)
    ref = torch.nn.functional.avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_grid(x, 24, 24, 64), ref)
    assert len({c[1] - c[0] for c in pool_cells(190, 24, 24)}) <= 2 and len(pool_cells(190, 24, 24)) == 190


# ---- the patched model against the reference ---------------------------------------------------------------
def _logits_with_features(model, inputs, feats: torch.Tensor) -> torch.Tensor:
    """The unpatched model on the prompt whose image placeholder run is cut to len(feats), with `feats` (the
    projected visual tokens) in the run: last-position logits."""
    ids = inputs["input_ids"][0].tolist()
    img = model.config.image_token_id
    first = ids.index(img)
    n_full = ids.count(img)
    short = ids[:first] + [img] * feats.shape[0] + ids[first + n_full:]
    short = torch.tensor([short])
    with torch.no_grad():
        emb = model.get_input_embeddings()(short)
        emb[0, first:first + feats.shape[0]] = feats
        return model(inputs_embeds=emb, attention_mask=torch.ones_like(short)).logits[:, -1]


@pytest.mark.parametrize("tokens", [16, 21, 7])
def test_logits_equal_the_plain_reference(tokens, capsys):
    proc = processor("llava")
    inputs = vision_inputs(proc, [1])
    ref_model = fresh_model("llava")
    with torch.no_grad():
        full = ref_model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output[0]
    ref_feats = plain_pool(full, tokens, SIDE, SIDE)
    ref = _logits_with_features(ref_model, inputs, ref_feats)

    model = fresh_model("llava")
    methods.build("pool", {"tokens": tokens}).apply(model, get_adapter(model))
    seen = []
    h = get_adapter(model).projector.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = model(**inputs).logits[:, -1]
    h.remove()
    torch.testing.assert_close(seen[0][0], ref_feats, rtol=1e-5, atol=1e-6)  # the pooled tokens themselves
    delta = float((out - ref).abs().max())
    with capsys.disabled():
        print(f"\npool tokens={tokens}: max |dlogit| vs plain reference = {delta:.2e}")
    assert delta < 1e-4


# ---- the properties every method passes ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_documented_noop_is_identical(family):
    proc = processor(family)
    inputs = vision_inputs(proc, [0, 1], family)
    model = fresh_model(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    cls = methods.get("pool")
    for params in (cls.noop, {"tokens": 64}):
        m = fresh_model(family)
        methods.build("pool", params).apply(m, get_adapter(m))
        with torch.no_grad():
            assert torch.equal(m(**inputs).logits, ref), params


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_example_really_reduces(family):
    m = fresh_model(family)
    methods.build("pool", methods.get("pool").example).apply(m, get_adapter(m))
    inputs = vision_inputs(processor(family), [0], family)
    n_full = int((inputs["input_ids"] == m.config.image_token_id).sum())
    assert llm_visual_tokens(m, inputs) < n_full


@pytest.mark.parametrize("value", [0.33, 0.22, 0.125, 24, 1.0])
def test_kept_count_meets_the_budget_on_every_sample_llava(value):
    """LLaVA-1.5: the per-prompt rule is met exactly, for 1, 2 and 3 images per prompt."""
    from tests.methods.helpers import inputs as prompt_inputs

    m = fresh_model("llava")
    meth = methods.build("pool", {"prompt_tokens": value})
    meth.apply(m, get_adapter(m))
    proc = processor("llava")
    for sizes in ([(64, 64)], [(64, 64), (48, 80)], [(64, 64)] * 3):
        inp = prompt_inputs(proc, [sizes])
        (layout,) = F.layouts_from_inputs(m, inp)
        want = prompt_count(value, layout.visual)
        if value > 1 and len(sizes) > 1:
            want = len(sizes) * round(value / len(sizes))  # every image the same k, nearest the target
        assert llm_visual_tokens(m, inp) == meth.visual_tokens_kept(layout) == want, (value, sizes)


@pytest.mark.parametrize("value", [0.33, 0.125])
def test_kept_count_on_every_llava_next_sample(value):
    """LLaVA-NeXT: every crop the same k; the prompt lands within crops/2 of the target and exactly on what
    `visual_tokens_kept` says (the budget records carry it)."""
    m = fresh_model("llava_next")
    meth = methods.build("pool", {"prompt_tokens": value})
    meth.apply(m, get_adapter(m))
    proc = processor("llava_next")
    for i in range(4):
        inp = vision_inputs(proc, [i], "llava_next")
        (layout,) = F.layouts_from_inputs(m, inp)
        got = llm_visual_tokens(m, inp)
        assert got == meth.visual_tokens_kept(layout)
        assert abs(got - prompt_count(value, layout.visual)) <= layout.images / 2 + 1e-9, (i, got, layout)


@pytest.mark.parametrize("family, params", [("llava", {"tokens": 21}), ("llava_next", {"tokens": 16}),
                                            ("llava_next", {"prompt_tokens": 0.33})])
def test_counted_flops_equal_analytic(family, params):
    m = fresh_model(family, "qwen2", gqa=True)
    meth = methods.build("pool", params)
    meth.apply(m, get_adapter(m))
    counted = check_flops(m, meth, vision_inputs(processor(family), [1], family))
    assert counted.unsupported_ops == {}


def test_cached_equals_uncached_and_batch_equals_single_llava():
    m = fresh_model("llava")
    methods.build("pool", {"prompt_tokens": 0.33}).apply(m, get_adapter(m))
    check_batch_equals_single(m, processor("llava"), "llava")


@pytest.mark.slow
@pytest.mark.parametrize("lm", ["llama", "mistral"])
def test_cached_equals_uncached_and_batch_equals_single_llava_next(lm):
    m = fresh_model("llava_next", lm, gqa=lm == "mistral")
    methods.build("pool", {"tokens": 21}).apply(m, get_adapter(m))
    check_batch_equals_single(m, processor("llava_next"), "llava_next")


@pytest.mark.slow
def test_full_size_meta_count_equals_analytic():
    from tests.methods.helpers import check_meta_flops

    check_meta_flops("pool", {"tokens": 64})
    check_meta_flops("pool", {"prompt_tokens": 0.33}, model="llava_next_7b")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_refuses_families_without_a_fixed_crop_grid_in_one_line(family):
    from harness.models.tiny import build_tiny

    model, _ = build_tiny(family, gqa=True, vision_layers=3)
    with pytest.raises(MethodError, match=f"refuses model family '{family}'") as e:
        methods.build("pool", {"tokens": 4}).apply(model, get_adapter(model))
    assert "\n" not in str(e.value)


def test_config_file_builds_the_noop():
    cfg = yaml.safe_load((ROOT / "conf/method/pool.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert m.params() == methods.get("pool").noop


# ---- bad parameters -------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("param, value", [
    ("tokens", 0), ("tokens", -3), ("tokens", 2.5), ("tokens", True), ("tokens", "a"), ("tokens", float("nan")),
    ("tokens", float("inf")), ("prompt_tokens", 0), ("prompt_tokens", -0.5), ("prompt_tokens", 2.5),
    ("prompt_tokens", float("nan")), ("prompt_tokens", float("-inf")), ("prompt_tokens", "x"),
    ("prompt_tokens", False), ("prompt_tokens", [1]),
])
def test_bad_parameters_are_named_in_one_line(param, value):
    with pytest.raises(MethodError) as e:
        methods.build("pool", {param: value})
    msg = str(e.value)
    assert msg.startswith(f"method.params.{param}={methods.show(value)}: "), msg
    assert "\n" not in msg


@pytest.mark.bad_input
def test_both_budget_parameters_and_too_many_tokens_are_refused():
    with pytest.raises(MethodError, match="either prompt_tokens or tokens"):
        methods.build("pool", {"tokens": 4, "prompt_tokens": 0.5})
    with pytest.raises(MethodError, match="exceeds the 64 visual tokens per crop"):
        m = fresh_model("llava")
        methods.build("pool", {"tokens": 65}).validate(get_adapter(m))


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, message", [
    (["method.params.tokens=nan"], "method.params.tokens=nan"),
    (["method.params.tokens=65"], "exceeds the 64 visual tokens per crop"),
    (["method.params.prompt_tokens=abc"], "method.params.prompt_tokens=abc"),
])
def test_cli_refuses_before_the_model_loads(extra, message, tiny_checkpoint, data_dir, tmp_path, capsys,
                                            monkeypatch):
    import harness.models.loading as loading
    from harness.cli.main import run_one

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = run_one([f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={tmp_path / 's'}",
                  "logger=none", "run.limit=3", "method=pool"] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vtbench:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "s").exists() or not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


# ---- both budget kinds reach it ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_token_and_flops_budgets_reach_it(family):
    from harness.budget import layout_for, resolve

    m = fresh_model(family)
    adapter = get_adapter(m)
    layout = layout_for(adapter, 64)
    tok, info = resolve(methods.build("pool", {}), adapter, {"kind": "tokens", "value": 0.25})
    assert tok.prompt_tokens == 0.25 and info["visual_tokens_to_llm"] == tok.visual_tokens_kept(layout)
    assert abs(info["visual_tokens_to_llm"] - prompt_count(0.25, layout.visual)) <= layout.images / 2
    dense = sum(F.analytic_prefill(m.config, layout).values())
    for target in (0.9, 0.7):
        fl, info = resolve(methods.build("pool", {}), adapter, {"kind": "flops", "value": target})
        assert isinstance(fl.tokens, int) and 1 <= fl.tokens < 64
        ratio = sum(F.analytic_prefill(m.config, layout, fl).values()) / dense
        assert ratio == pytest.approx(info["predicted_flops_ratio"]) and abs(ratio - target) < 0.05, (target, ratio)


# ---- asked-cell recall on `shapes` (harness/recall.py) -----------------------------------------------------
@pytest.mark.parametrize("tokens", [16, 21])
def test_asked_cell_recall_counts_each_patch_by_its_cell(tokens):
    """A pooled token holds 1/|cell| of each patch of its cell (the ToMe convention for a merged token), so the
    recall is sum over cells c of sum_{p in c} w_p / |c|, over sum_p w_p (computed here with the plain cells)."""
    from harness.recall import cell_patch_weights, layer_recall, track

    m = fresh_model("llava")
    methods.build("pool", {"tokens": tokens}).apply(m, get_adapter(m))
    track(m, True)
    proc = processor("llava")
    q = "What colour is the shape in row 2, column 3?"
    inputs = proc(images=__import__("tests.efficiency.helpers", fromlist=["image"]).image(0, (64, 64)),
                  text=proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                                add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        m.generate(**inputs, max_new_tokens=1, do_sample=False)
    (rec,) = layer_recall(m, get_adapter(m), inputs["input_ids"], [q])
    w = cell_patch_weights(6, SIDE)
    carried = 0.0  # adaptive cells may overlap: a patch in two cells counts in each
    for r0, r1, c0, c1 in plain_cells(tokens, SIDE, SIDE):
        for r in range(r0, r1):
            for c in range(c0, c1):
                carried += w.get(r * SIDE + c, 0.0) / ((r1 - r0) * (c1 - c0))
    want = carried / sum(w.values())
    assert rec == pytest.approx([want] * 4, rel=1e-5)


def test_llava_next_every_crop_pooled_like_the_plain_reference():
    """LLaVA-NeXT: each anyres crop's projected grid is pooled on its own (the plain loop per crop), and the
    LLM input holds [crop 1 k tokens, ..., crop c k tokens, image_newline] per image."""
    proc = processor("llava_next")
    inputs = vision_inputs(proc, [1], "llava_next")
    ref_model = fresh_model("llava_next")
    full = []
    h = get_adapter(ref_model).projector.register_forward_hook(lambda m, a, out: full.append(out))
    with torch.no_grad():
        ref_model(**inputs)
    h.remove()
    model = fresh_model("llava_next")
    methods.build("pool", {"tokens": 21}).apply(model, get_adapter(model))
    seen = []
    h = get_adapter(model).projector.register_forward_hook(lambda m, a, out: seen.append(out))
    n = llm_visual_tokens(model, inputs)
    h.remove()
    crops = full[0].shape[0]
    assert crops > 1 and seen[0].shape == (crops, 21, full[0].shape[2]) and n == crops * 21 + 1
    for c in range(crops):
        torch.testing.assert_close(seen[0][c], plain_pool(full[0][c], 21, SIDE, SIDE), rtol=1e-5, atol=1e-6)
