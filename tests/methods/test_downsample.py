"""`downsample` (methods/downsample.py): the grid rule, the patched model against a plain reference (PIL resize
of the processor's image + a plain processor call for the prompt + CLIP with interpolated positions), the
documented no-op, the kept count on every sample (exactly the budget's), counted FLOPs == analytic (the vision
tower's share falls), cached == uncached, padded batch == single prompts, refusals of counts without a grid
(one line, naming the nearest counts), bad parameters."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import methods
from harness.budget import prompt_count
from harness.efficiency import flops as F
from harness.models import get_adapter
from methods._shared.grid import downsample_grid, exact_grid, reachable_counts
from methods.base import MethodError
from tests.methods.helpers import (
    VISION_QUESTIONS,
    check_batch_equals_single,
    check_flops,
    fresh_model,
    llm_visual_tokens,
    processor,
    vision_inputs,
)

ROOT = Path(__file__).resolve().parents[2]


def plain_grid(k: int, side: int) -> tuple[int, int] | None:
    """Every rows x cols == k with rows <= cols <= 2 rows inside the side x side grid, by enumeration; the one
    with the smallest cols - rows (the most square); None if there is none."""
    if k >= side * side:
        return side, side
    shapes = [(r, c) for r in range(1, side + 1) for c in range(r, min(2 * r, side) + 1) if r * c == k]
    return min(shapes, key=lambda rc: rc[1] - rc[0]) if shapes else None


@pytest.mark.parametrize("side", [8, 12, 24])
def test_grid_is_the_most_square_exact_rectangle_with_aspect_at_most_2(side):
    for k in range(1, side * side + 1):
        assert exact_grid(k, side, side) == plain_grid(k, side), k
        if plain_grid(k, side) is None:
            with pytest.raises(ValueError, match=f"exactly {k} patches"):
                downsample_grid(k, side, side)
        else:
            rows, cols = downsample_grid(k, side, side)
            assert rows * cols == k and rows <= cols <= 2 * rows
    assert reachable_counts(side, side) == [k for k in range(1, side * side + 1) if plain_grid(k, side)]
    # the brief's examples: the default sweep on model=tiny (144 per image) and LLaVA-1.5-7B (576)
    assert [exact_grid(k, 12, 12) for k in (48, 32, 18)] == [(6, 8), (4, 8), (3, 6)]
    assert [exact_grid(k, 24, 24) for k in (64, 128, 192, 190)] == [(8, 8), (8, 16), (12, 16), (10, 19)]
    assert exact_grid(127, 24, 24) is None and exact_grid(10, 24, 24) is None and exact_grid(63, 8, 8) is None


# ---- the plain reference -----------------------------------------------------------------------------------
def plain_logits(model, proc, i: int, rows: int, cols: int) -> torch.Tensor:
    """Sample i through the unpatched model at rows x cols patches: the processor's image resized with PIL
    (float mode per channel, bicubic: PIL's antialiased kernel), the prompt from a plain processor call on
    an image of that size (the processor counts the placeholders), CLIP run with interpolated positions."""
    full = vision_inputs(proc, [i])
    p = model.config.vision_config.patch_size
    chans = [np.asarray(Image.fromarray(full["pixel_values"][0, c].numpy(), mode="F")
                        .resize((cols * p, rows * p), Image.BICUBIC)) for c in range(3)]
    pixels = torch.from_numpy(np.stack(chans))[None]
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                      "text": VISION_QUESTIONS[i]}]}], add_generation_prompt=True)
    plain = proc(images=np.zeros((rows * p, cols * p, 3), dtype=np.uint8), text=prompt, do_resize=False,
                 do_center_crop=False, return_tensors="pt")
    assert tuple(plain["pixel_values"].shape[-2:]) == (rows * p, cols * p)
    base = model.model
    with torch.no_grad():
        hs = base.vision_tower(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        feats = base.multi_modal_projector(hs[-2][:, 1:])
        ids = plain["input_ids"]
        emb = model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], feats)
        return model(inputs_embeds=emb, attention_mask=plain["attention_mask"]).logits[:, -1], feats


@pytest.mark.parametrize("tokens", [16, 20, 32])
def test_logits_equal_the_plain_reference(tokens, capsys):
    proc = processor("llava")
    rows, cols = plain_grid(tokens, 8)
    ref, ref_feats = plain_logits(fresh_model("llava"), proc, 1, rows, cols)
    model = fresh_model("llava")
    methods.build("downsample", {"tokens": tokens}).apply(model, get_adapter(model))
    seen = []
    h = get_adapter(model).projector.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = model(**vision_inputs(proc, [1])).logits[:, -1]
    h.remove()
    assert seen[0].shape[1] == rows * cols == ref_feats.shape[1]
    torch.testing.assert_close(seen[0], ref_feats, rtol=1e-4, atol=1e-4)
    delta = float((out - ref).abs().max())
    with capsys.disabled():
        print(f"\ndownsample tokens={tokens} ({rows}x{cols}): max |dlogit| vs plain reference = {delta:.2e}")
    assert delta < 1e-4


# ---- the properties every method passes ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_documented_noop_is_identical(family):
    proc = processor(family)
    inputs = vision_inputs(proc, [0, 1], family)
    model = fresh_model(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    for params in (methods.get("downsample").noop, {"tokens": 64}, {"tokens": 70}):
        m = fresh_model(family)
        if params.get("tokens") == 70:
            with pytest.raises(MethodError, match="exceeds"):
                methods.build("downsample", params).apply(m, get_adapter(m))
            continue
        methods.build("downsample", params).apply(m, get_adapter(m))
        with torch.no_grad():
            assert torch.equal(m(**inputs).logits, ref), params


def test_full_size_through_the_patched_tower_is_identical():
    """The resize hook and the interpolated positions at the full size change nothing (a per-prompt budget
    of the whole prompt takes that path on LLaVA-1.5)."""
    proc = processor("llava")
    inputs = vision_inputs(proc, [0, 1])
    model = fresh_model("llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    m = fresh_model("llava")
    methods.build("downsample", {"prompt_tokens": 1.0}).apply(m, get_adapter(m))
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, ref)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_example_really_reduces_and_the_tower_runs_smaller(family):
    m = fresh_model(family)
    methods.build("downsample", methods.get("downsample").example).apply(m, get_adapter(m))
    inputs = vision_inputs(processor(family), [0], family)
    seen = []
    h = get_adapter(m).vision_tower.register_forward_hook(lambda mod, a, out: seen.append(out.last_hidden_state))
    n_full = int((inputs["input_ids"] == m.config.image_token_id).sum())
    assert llm_visual_tokens(m, inputs) < n_full
    h.remove()
    assert seen[0].shape[1] == 16 + 1  # 4x4 patches + CLS through every CLIP layer


@pytest.mark.parametrize("value", [0.375, 0.25, 0.125, 24])
def test_kept_count_on_every_sample(value):
    """LLaVA-1.5, 1-3 images per prompt: every image gets the exact grid of the per-image target, so the prompt
    gets what `visual_tokens_kept` says and the budget rule asks (within images // 2: one k per image)."""
    from tests.methods.helpers import inputs as prompt_inputs

    m = fresh_model("llava")
    meth = methods.build("downsample", {"prompt_tokens": value})
    meth.apply(m, get_adapter(m))
    proc = processor("llava")
    for sizes in ([(64, 64)], [(64, 64), (48, 80)], [(64, 64)] * 3):
        inp = prompt_inputs(proc, [sizes])
        (layout,) = F.layouts_from_inputs(m, inp)
        got = llm_visual_tokens(m, inp)
        target = prompt_count(value, layout.visual)
        assert got == meth.visual_tokens_kept(layout), (value, sizes)
        assert abs(got - target) <= len(sizes) // 2, (value, sizes, got, target)
        k = round(target / len(sizes))
        assert plain_grid(k, 8) is not None and got == len(sizes) * k


@pytest.mark.bad_input
def test_a_prompt_beyond_the_checked_ones_is_refused_in_one_line():
    """A count of 16 holds on prompts of one and two images (16 = 4x4, 8 = 2x4 per image), so it validates; a
    prompt of three images would need 5 patches per image (prime): refused when it arrives, in one line."""
    from tests.methods.helpers import inputs as prompt_inputs

    m = fresh_model("llava")
    methods.build("downsample", {"prompt_tokens": 16}).apply(m, get_adapter(m))
    with pytest.raises(MethodError) as e:
        llm_visual_tokens(m, prompt_inputs(processor("llava"), [[(64, 64)] * 3]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("method.params.prompt_tokens=16: ")
    assert "exactly 5 patches per image" in msg and "budget.value=16" in msg and "3 image(s)" in msg, msg
    assert "(nearest: 4 = 2x2, 6 = 2x3)" in msg, msg


def test_kept_count_on_every_llava_next_sample():
    """LLaVA-NeXT with a fixed count per crop: every crop gets its exact grid, one newline per image."""
    m = fresh_model("llava_next")
    meth = methods.build("downsample", {"tokens": 18})
    meth.apply(m, get_adapter(m))
    proc = processor("llava_next")
    for i in range(4):
        inp = vision_inputs(proc, [i], "llava_next")
        (layout,) = F.layouts_from_inputs(m, inp)
        got = llm_visual_tokens(m, inp)
        assert got == meth.visual_tokens_kept(layout) == inp["pixel_values"].shape[1] * 18 + 1, i


@pytest.mark.parametrize("family, params", [("llava", {"tokens": 20}), ("llava_next", {"tokens": 16}),
                                            ("llava", {"prompt_tokens": 0.375})])
def test_counted_flops_equal_analytic_and_the_vision_tower_shrinks(family, params):
    m = fresh_model(family, "qwen2", gqa=True)
    meth = methods.build("downsample", params)
    meth.apply(m, get_adapter(m))
    inputs = vision_inputs(processor(family), [1], family)
    counted = check_flops(m, meth, inputs)
    assert counted.unsupported_ops == {}
    dense = F.analytic_prefill(m.config, F.layouts_from_inputs(m, inputs)[0])
    assert counted.flops["vision"] < dense["vision"] / 2


def test_cached_equals_uncached_and_batch_equals_single_llava():
    m = fresh_model("llava")
    methods.build("downsample", {"prompt_tokens": 0.375}).apply(m, get_adapter(m))
    check_batch_equals_single(m, processor("llava"), "llava")


@pytest.mark.slow
@pytest.mark.parametrize("lm", ["llama", "mistral"])
def test_cached_equals_uncached_and_batch_equals_single_llava_next(lm):
    m = fresh_model("llava_next", lm, gqa=lm == "mistral")
    methods.build("downsample", {"tokens": 20}).apply(m, get_adapter(m))
    check_batch_equals_single(m, processor("llava_next"), "llava_next")


@pytest.mark.slow
def test_full_size_meta_count_equals_analytic():
    from tests.methods.helpers import check_meta_flops

    check_meta_flops("downsample", {"tokens": 64})
    check_meta_flops("downsample", {"prompt_tokens": 0.33})  # 190 = 10 x 19 per image
    check_meta_flops("downsample", {"tokens": 48}, model="llava_next_7b")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_refuses_families_without_a_fixed_crop_grid_in_one_line(family):
    from harness.models.tiny import build_tiny

    model, _ = build_tiny(family, gqa=True, vision_layers=3)
    with pytest.raises(MethodError, match=f"refuses model family '{family}'") as e:
        methods.build("downsample", {"tokens": 4}).apply(model, get_adapter(model))
    assert "\n" not in str(e.value)


def test_config_file_builds_the_noop():
    cfg = yaml.safe_load((ROOT / "conf/method/downsample.yaml").read_text())
    assert methods.build(cfg["name"], cfg["params"]).params() == methods.get("downsample").noop


# ---- bad parameters -------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("param, value", [
    ("tokens", 0), ("tokens", -1), ("tokens", 3.5), ("tokens", True), ("tokens", "a"), ("tokens", float("nan")),
    ("tokens", float("inf")), ("prompt_tokens", 0), ("prompt_tokens", 1.5), ("prompt_tokens", float("nan")),
    ("prompt_tokens", float("inf")), ("prompt_tokens", "x"), ("prompt_tokens", True),
])
def test_bad_parameters_are_named_in_one_line(param, value):
    with pytest.raises(MethodError) as e:
        methods.build("downsample", {param: value})
    msg = str(e.value)
    assert msg.startswith(f"method.params.{param}={methods.show(value)}: "), msg
    assert "\n" not in msg


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, message", [
    (["method.params.tokens=inf"], "method.params.tokens=inf"),
    (["method.params.tokens=4", "method.params.prompt_tokens=0.5"], "either prompt_tokens or tokens"),
    (["method.params.tokens=19"], "method.params.tokens=19: downsample cannot resize to exactly 19 patches per image"),
    (["budget.kind=tokens", "budget.value=0.3"], "budget.value=0.3: downsample cannot keep 19 visual tokens: "),
])
def test_cli_refuses_before_the_model_loads(extra, message, tiny_checkpoint, data_dir, tmp_path, capsys,
                                            monkeypatch):
    import harness.models.loading as loading
    from harness.cli.main import run_one

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = run_one([f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={tmp_path / 's'}",
                  "logger=none", "run.limit=3", "method=downsample"] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vtbench:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "s").exists() or not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


# ---- both budget kinds reach it ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_token_and_flops_budgets_reach_it(family):
    """A token budget with an exact grid is delivered exactly (LLaVA-1.5: 0.25 -> 16 = 4x4); LLaVA-NeXT's per-crop
    targets move with the crop count and image size, so a share is refused in one line; a FLOPs budget only
    picks counts that have an exact grid."""
    from harness.budget import BudgetError, layout_for, resolve

    m = fresh_model(family)
    adapter = get_adapter(m)
    layout = layout_for(adapter, 64)
    if family == "llava":
        tok, info = resolve(methods.build("downsample", {}), adapter, {"kind": "tokens", "value": 0.25})
        assert tok.prompt_tokens == 0.25 and info["visual_tokens_to_llm"] == tok.visual_tokens_kept(layout)
        assert info["visual_tokens_to_llm"] == prompt_count(0.25, layout.visual) == 16
    else:
        with pytest.raises(BudgetError) as e:
            resolve(methods.build("downsample", {}), adapter, {"kind": "tokens", "value": 0.25})
        assert "\n" not in str(e.value) and "budget.value=0.25" in str(e.value), str(e.value)
        assert "varies with the size of a LLaVA-NeXT image" in str(e.value)
    assert methods.build("downsample", {}).budget_candidates(adapter) == [k for k in range(1, 65) if plain_grid(k, 8)]
    dense = sum(F.analytic_prefill(m.config, layout).values())
    for target in (0.6, 0.4, 0.3):
        fl, info = resolve(methods.build("downsample", {}), adapter, {"kind": "flops", "value": target})
        assert isinstance(fl.tokens, int) and 1 <= fl.tokens < 64 and plain_grid(fl.tokens, 8) is not None
        ratio = sum(F.analytic_prefill(m.config, layout, fl).values()) / dense
        assert ratio == pytest.approx(info["predicted_flops_ratio"]) and abs(ratio - target) < 0.1, (target, ratio)


@pytest.mark.bad_input
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_every_count_without_a_grid_is_refused_in_one_line_naming_the_nearest(family):
    """For every per-crop count 1..64: a count with an exact grid validates and is delivered by `tokens`
    (`visual_tokens_kept`), one without is refused in one line naming the nearest counts that have one."""
    m = fresh_model(family)
    adapter = get_adapter(m)
    unit = "crop" if family == "llava_next" else "image"
    ok = [k for k in range(1, 65) if plain_grid(k, 8)]
    for k in range(1, 65):
        meth = methods.build("downsample", {"tokens": k})
        if plain_grid(k, 8) is not None:
            meth.validate(adapter)
            assert meth.delivered(k, meth._geom) == k
            continue
        with pytest.raises(MethodError) as e:
            meth.validate(adapter)
        below, above = max(c for c in ok if c < k), min(c for c in ok if c > k)
        near = ", ".join(f"{c} = {'x'.join(map(str, plain_grid(c, 8)))}" for c in (below, above))
        assert str(e.value) == (f"method.params.tokens={k}: downsample cannot resize to exactly {k} patches per {unit} "
                                f"with an aspect ratio <= 2 (nearest: {near})")


@pytest.mark.bad_input
@pytest.mark.parametrize("value, why", [
    (20, "exactly 10 patches per image with an aspect ratio <= 2 (nearest: 9 = 3x3, 12 = 3x4), the per-crop target of "
         "budget.value=20 on a prompt of 2 image(s)"),
    (0.3, "exactly 19 patches per image with an aspect ratio <= 2 (nearest: 18 = 3x6, 20 = 4x5), the per-crop target "
          "of budget.value=0.3 on a prompt of 1 image(s)"),
])
def test_token_budgets_without_a_grid_are_refused_at_validation(value, why):
    from harness.budget import BudgetError, resolve

    m = fresh_model("llava")
    with pytest.raises(BudgetError) as e:
        resolve(methods.build("downsample", {}), get_adapter(m), {"kind": "tokens", "value": value})
    msg = str(e.value)
    assert "\n" not in msg and why in msg, msg
    assert ("nearest counts that hold on every prompt of one or two images: 18, 24" in msg if value == 20
            else "nearest shares that give one image an exact grid: 0.2812, 0.3125" in msg), msg


# ---- asked-cell recall on `shapes` (harness/recall.py) -----------------------------------------------------
@pytest.mark.parametrize("tokens", [16, 20])
def test_asked_cell_recall_is_the_resolution_share(tokens):
    """Each new patch's footprint covers (64 / k) original patches; a patch of the asked cell is spread over
    the new patches covering it, 1 / footprint of it each, so the recall is k / 64 wherever the cell lies."""
    from harness.recall import layer_recall, track
    from tests.efficiency.helpers import image

    m = fresh_model("llava")
    methods.build("downsample", {"tokens": tokens}).apply(m, get_adapter(m))
    track(m, True)
    proc = processor("llava")
    recs = []
    for q in ("What colour is the shape in row 2, column 3?", "Which letter is in row 1, column 1?"):
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                        add_generation_prompt=True)
        inputs = proc(images=image(0, (64, 64)), text=text, return_tensors="pt")
        with torch.no_grad():
            m.generate(**inputs, max_new_tokens=1, do_sample=False)
        recs += layer_recall(m, get_adapter(m), inputs["input_ids"], [q])
    rows, cols = plain_grid(tokens, 8)
    for rec in recs:
        assert rec == pytest.approx([rows * cols / 64] * 4, rel=1e-5)


def test_llava_next_every_crop_resized_like_the_plain_reference():
    """LLaVA-NeXT: each anyres crop the tower sees is that crop resized with PIL (float mode, bicubic), and the
    LLM input holds [crop 1 tokens, ..., crop c tokens, image_newline]."""
    proc = processor("llava_next")
    inputs = vision_inputs(proc, [1], "llava_next")
    model = fresh_model("llava_next")
    methods.build("downsample", {"tokens": 20}).apply(model, get_adapter(model))
    seen = []
    h = get_adapter(model).vision_tower.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    n = llm_visual_tokens(model, inputs)
    h.remove()
    crops = inputs["pixel_values"][0]
    assert seen[0].shape == (crops.shape[0], 3, 32, 40) and n == crops.shape[0] * 20 + 1
    for c in range(crops.shape[0]):
        ref = np.stack([np.asarray(Image.fromarray(crops[c, ch].numpy(), mode="F").resize((40, 32), Image.BICUBIC))
                        for ch in range(3)])
        torch.testing.assert_close(seen[0][c], torch.from_numpy(ref), rtol=0, atol=2e-5)
