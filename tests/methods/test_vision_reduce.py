"""Shared vision-encoder reduction machinery (methods/_shared/vision_reduce.py).

Also holds the checks the ToMe / FiCoCo-V test files reuse (`make_inputs`, `check_decode_consistency`,
`check_batch_equals_single`, `check_flops`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared.context import get_context
from methods._shared.vision_reduce import (
    VisionReducer,
    install_placeholder_shrink,
    last_vision_state,
    patch_vision_layers,
    shrink_placeholders,
    split_evenly,
)

QUESTIONS = ["What colour?", "How many circles are there in the top left?", "Which letter?", "Is it red?"]
IMAGE_SIZES = [(64, 64), (64, 128), (128, 64), (64, 64)]


# ---- helpers reused by test_tome.py / test_ficoco_v.py ------------------------------------------------
def image(i: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(i)
    return Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype("uint8"))


def make_inputs(processor, idx: list[int], family: str = "llava"):
    """Processor inputs for samples `idx` (different questions -> different lengths -> left padding)."""
    prompts, images = [], []
    for i in idx:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}]
        prompts.append(processor.apply_chat_template(conv, add_generation_prompt=True))
        images.append(image(i, IMAGE_SIZES[i] if family == "llava_next" else (64, 64)))
    if len(idx) == 1:
        return processor(images=images[0], text=prompts[0], return_tensors="pt")
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _image_kwargs(inputs):
    return {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}


def generate(model, inputs, n_new):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    T = inputs["input_ids"].shape[1]
    return out.sequences[:, T:], torch.stack(out.logits, dim=1)  # [B, n], [B, n, V]


def check_decode_consistency(model, inputs, n_new=4, eos=2, recompute_ctx=None):
    """Greedy generation with KV cache == step-by-step recomputation without cache (same method
    applied). `recompute_ctx(inputs)`, if given, is a context manager entered around the uncached
    forwards (e.g. pinning an LLM-side method's scoring to the prompt). Returns tokens and logits."""
    import contextlib

    new, logits = generate(model, inputs, n_new)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    for t in range(n_new):
        x = torch.cat([ids, new[:, :t]], dim=1)
        m = torch.cat([am, torch.ones_like(new[:, :t])], dim=1)
        with torch.no_grad(), (recompute_ctx(inputs) if recompute_ctx else contextlib.nullcontext()):
            ref = model(input_ids=x, attention_mask=m, use_cache=False, **_image_kwargs(inputs)).logits[:, -1]
        for b in range(x.shape[0]):
            if (new[b, :t] == eos).any():
                continue  # finished sample: generate pads it
            assert torch.allclose(ref[b], logits[b, t], atol=1e-4, rtol=1e-4), (b, t)
            assert int(ref[b].argmax()) == int(new[b, t]), (b, t)
    return new, logits


def check_batch_equals_single(model, processor, family="llava", n_new=4, eos=2, idx=(0, 1, 2, 3), recompute_ctx=None):
    """Batch of 4 with left padding: each sample's greedy tokens/logits == its batch-1 run."""
    batch = make_inputs(processor, list(idx), family)
    new_b, logits_b = check_decode_consistency(model, batch, n_new, eos, recompute_ctx)
    for j, i in enumerate(idx):
        new_1, logits_1 = generate(model, make_inputs(processor, [i], family), n_new)
        stop = n_new
        hits = (new_1[0] == eos).nonzero()
        if len(hits):
            stop = int(hits[0]) + 1
        assert torch.equal(new_b[j, :stop], new_1[0, :stop]), (i, new_b[j], new_1[0])
        assert torch.allclose(logits_b[j, :stop], logits_1[0, :stop], atol=1e-4, rtol=1e-4), i


def check_flops(model, method, inputs):
    """Counted (fvcore, per component) == the method's analytic formula, all four components."""
    from harness.efficiency.flops import analytic_prefill, count_prefill, layouts_from_inputs

    layout = layouts_from_inputs(model, inputs)[0]
    counted = count_prefill(model, inputs)
    analytic = analytic_prefill(model.config, layout, method)
    assert counted.flops == analytic, (counted.flops, analytic)
    return counted


def llm_visual_tokens(model, inputs) -> int:
    """Visual tokens the LLM received in one prefill (from the visual-token context)."""
    with torch.no_grad():
        model(**inputs)
    ctx = get_context(model)
    per_layer = ctx.visual_tokens_per_layer
    assert per_layer is not None and len(set(per_layer)) == 1
    return per_layer[0]


# ---- tests of the machinery ------------------------------------------------------------------------------
def test_split_evenly_matches_spec_budgets():
    layers = list(range(23))
    for tokens, expect in [(192, (7, 16, 16, 17)), (128, (12, 19, 11, 20)), (64, (17, 22, 6, 23))]:
        s = split_evenly(576 - tokens, layers)
        vals = [s[i] for i in layers]
        n_lo, lo, n_hi, hi = expect
        assert vals == [lo] * n_lo + [hi] * n_hi
        assert sum(vals) == 576 - tokens


def test_shrink_placeholders_equal_and_ragged():
    I, P = 9, 0
    ids = torch.tensor([[P, 1, I, I, I, I, 5], [1, 7, I, I, I, I, 5]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    new, mask, changed = shrink_placeholders(ids, am, [4, 4], [2, 2], I, P)
    assert changed
    assert new.tolist() == [[P, 1, I, I, 5], [1, 7, I, I, 5]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # already reduced: unchanged
    again, mask2, changed2 = shrink_placeholders(new, mask, [4, 4], [2, 2], I, P)
    assert not changed2 and again is new
    # different numbers of images per sample -> re-left-padded
    ids = torch.tensor([[1, I, I, I, 5, I, I, I, 6], [P, P, P, P, P, 1, I, I, I]])
    am = (ids != P).long()
    new, mask, _ = shrink_placeholders(ids, am, [3, 3, 3], [1, 1, 1], I, P)
    assert new.tolist() == [[1, I, 5, I, 6], [P, P, P, 1, I]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="placeholder"):
        shrink_placeholders(ids[:, :-1], am[:, :-1], [3, 3, 3], [1, 1, 1], I, P)


class _NoOp(VisionReducer):
    def reduce(self, layer, x, q, k, state, r):  # pragma: no cover - never called with r=0
        raise AssertionError


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_layers_are_exact(attn):
    """Every CLIP layer routed through the patched forward (r=0, prop-attn on) -> identical logits."""
    model, proc = build_tiny("llava", "llama", vision_layers=4, attn_implementation=attn)
    inputs = make_inputs(proc, [0, 1], "llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    red = _NoOp({})
    red.prop_attn = True
    patch_vision_layers(model, get_adapter(model), red, force_layers={0, 1, 2, 3})
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert last_vision_state(model).tokens_in == {0: 65, 1: 65, 2: 65, 3: 65}


class _DropLast(VisionReducer):
    """Drops the last r tokens (a trivial reducer to exercise the plumbing)."""

    def reduce(self, layer, x, q, k, state, r):
        state.pos = state.pos[:, :-r]
        return x[:, :-r]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_placeholder_shrink_and_generate_output(family):
    model, proc = build_tiny(family, "llama", vision_layers=4)
    adapter = get_adapter(model)
    patch_vision_layers(model, adapter, _DropLast({0: 10, 2: 20}))
    k = adapter.visual_tokens_per_image - 30
    install_placeholder_shrink(model, adapter, k)
    inputs = make_inputs(proc, [1], family)
    crops = inputs["pixel_values"].shape[1] if family == "llava_next" else 1
    expected = crops * k + (1 if family == "llava_next" else 0)
    assert llm_visual_tokens(model, inputs) == expected
    assert last_vision_state(model).tokens_in == {0: 65, 1: 55, 2: 55, 3: 35}
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    T = inputs["input_ids"].shape[1]
    assert out.shape == (1, T + 3) and torch.equal(out[:, :T], inputs["input_ids"])


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size s attends/is attended like s identical copies of it (ToMe's prop-attn)."""
    from methods._shared.vision_reduce import VisionState

    model, _ = build_tiny("llava", "llama", vision_layers=4)
    adapter = get_adapter(model)
    red = _NoOp({})
    red.prop_attn = True
    holder = patch_vision_layers(model, adapter, red, force_layers={1})
    layer = adapter.vision_layers[1]
    torch.manual_seed(0)
    x = torch.randn(1, 5, adapter.vision_config.hidden_size)
    dup = torch.cat([x[:, :3], x[:, 2:3], x[:, 2:3], x[:, 3:]], dim=1)  # token 2 three times
    with torch.no_grad():
        holder.state = VisionState(size=torch.tensor([[1.0, 1, 3, 1, 1]]), pos=torch.arange(5)[None])
        merged = layer(x, None)
        holder.state = VisionState(size=torch.ones(1, 7), pos=torch.arange(7)[None])
        copies = layer(dup, None)
    holder.state = None
    assert torch.allclose(merged, copies[:, [0, 1, 2, 5, 6]], atol=1e-5)


def test_positional_calls_are_shrunk_too():
    model, proc = build_tiny("llava", "llama", vision_layers=4)
    adapter = get_adapter(model)
    patch_vision_layers(model, adapter, _DropLast({1: 30}))
    install_placeholder_shrink(model, adapter, adapter.visual_tokens_per_image - 30)
    inputs = make_inputs(proc, [1])
    ids, pv, am = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        assert torch.equal(model(ids, pv, am).logits, model(**inputs).logits)
    g = model.generate(ids, pixel_values=pv, attention_mask=am, max_new_tokens=2, do_sample=False)
    assert torch.equal(g, model.generate(**inputs, max_new_tokens=2, do_sample=False))


def check_meta_flops(name: str, params: dict, model: str = "llava15_7b"):
    """Full-size architecture on the meta device (no weights): counted prefill == analytic."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import methods
    from harness.efficiency import flops as F
    from harness.models.loading import config_from_cfg, meta_model

    root = Path(__file__).resolve().parents[2]
    config = config_from_cfg(OmegaConf.load(root / f"conf/model/{model}.yaml"))
    meta = meta_model(config)
    method = methods.build(name, params)
    method.apply(meta, get_adapter(meta))
    layout = F.synthetic_layout(config)
    counted = F.count_prefill(meta, F.synthetic_inputs(config))
    assert counted.flops == F.analytic_prefill(config, layout, method)
