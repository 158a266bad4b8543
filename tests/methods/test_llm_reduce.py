"""Shared in-LLM token-reduction machinery (`methods._shared.llm_reduce`): slicing with every token kept
reproduces the model (SDPA and eager, left padding, generation); dropping in place equals the
"mask variant" (dropped tokens masked as keys, positions unchanged) computed independently; per-layer
cache lengths and the visual-token log; errors. The helpers at the top are reused by the FastV,
`random` and FiCoCo-L tests."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError

QUESTIONS = [
    "What is shown?",
    "How many circles are there in the image?",
    "Which letter?",
    "Is there a red square left of the blue star?",
]
_CACHE: dict = {}


# ---- helpers (imported by the method tests) ---------------------------------------------------------
def tiny(family="llava", lm="llama", gqa=False, attn="sdpa", num_layers=4):
    key = (family, lm, gqa, attn, num_layers)
    if key not in _CACHE:
        _CACHE[key] = build_tiny(family, lm, gqa=gqa, attn_implementation=attn, num_layers=num_layers)
    model, proc = _CACHE[key]
    return copy.deepcopy(model), proc


def make_inputs(proc, idx=(0,), size=(64, 64)):
    """Processor inputs for samples `idx` (batch > 1: left padded). size=(w, h) of every image."""
    imgs, texts = [], []
    for i in idx:
        w, h = size[i] if isinstance(size, dict) else size
        rs = np.random.RandomState(i)
        imgs.append(Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")))
        texts.append(proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}],
            add_generation_prompt=True))
    if len(idx) == 1:
        return proc(images=imgs[0], text=texts[0], return_tensors="pt")
    return proc(images=imgs, text=texts, return_tensors="pt", padding=True)


def forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def generate(model, inputs, steps):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1), out.past_key_values


def check_uncached(model, inputs, seqs, logits, pin=True):
    """Each greedy step recomputed without cache (full forward over prompt + generated prefix, the
    scoring token pinned to the prompt's last token) agrees with the cached generation."""
    P = inputs["input_ids"].shape[1]
    if pin and LR.get_reducer(model) is not None:
        LR.pin_prompt_length(model, P)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    try:
        for j in range(logits.shape[1]):
            ids = seqs[:, : P + j]
            mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], j, dtype=torch.long)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = forward(model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **extra},
                          use_cache=False).logits[:, -1]
            torch.testing.assert_close(out, logits[:, j], atol=1e-4, rtol=1e-4)
            assert torch.equal(out.argmax(-1), seqs[:, P + j])
    finally:
        if LR.get_reducer(model) is not None:
            LR.pin_prompt_length(model, None)


def check_decode_consistency(model, proc, steps=3, size=(64, 64)):
    """Cached == uncached greedy decoding at batch 4 (left padded) and batch 1, and the batch result per
    sample equals the batch-1 result."""
    idx = (0, 1, 2, 3)
    inp4 = make_inputs(proc, idx, size=size)
    assert int((inp4["attention_mask"] == 0).sum()) > 0  # really padded
    seqs4, logits4, _ = generate(model, inp4, steps)
    check_uncached(model, inp4, seqs4, logits4)
    for b in idx:
        one = make_inputs(proc, (b,), size=size)
        s1, l1, _ = generate(model, one, steps)
        if b == 0:
            check_uncached(model, one, s1, l1)
        torch.testing.assert_close(l1[0], logits4[b], atol=1e-4, rtol=1e-4)
        assert torch.equal(s1[0, -steps:], seqs4[b, -steps:])
    return seqs4, logits4


# ---- test plans -----------------------------------------------------------------------------------
class FixedDrop(LR.ReductionPlan):
    """Drops visual tokens whose ordinal % every == 0 at `layer` (every=None: keeps all, sliced)."""

    def __init__(self, layer, every=None, positions="keep"):
        self.first_layer, self.every, self.positions = layer, every, positions

    def dropped(self, visual):
        if self.every is None:
            return torch.zeros_like(visual)
        ordinal = visual.long().cumsum(1) - 1
        return visual & (ordinal % self.every == 0)

    def before_layer(self, view):
        if view.layer != self.first_layer:
            return None
        drop = self.dropped(view.visual)
        B, n = drop.shape
        return torch.arange(n).expand(B, n)[~drop].view(B, -1)


def install_plan(model, plan):
    return LR.install(model, get_adapter(model), plan)


def mask_variant(model, layer, drop):
    """Reference: layers >= `layer` see `drop` [B, P] tokens masked as keys (positions unchanged)."""
    am = None

    def wrap(orig):
        def fwd(hidden_states, **kw):
            P = hidden_states.shape[1]
            if P == drop.shape[1]:
                valid = am.bool() if am is not None else torch.ones_like(drop)
                causal = torch.ones(P, P, dtype=torch.bool).tril()
                allowed = causal[None, None] & (valid & ~drop)[:, None, None, :]
                kw["attention_mask"] = allowed
            return orig(hidden_states, **kw)
        return fwd

    for lyr in get_adapter(model).llm_layers[layer:]:
        lyr.forward = wrap(lyr.forward)

    def set_mask(m):
        nonlocal am
        am = m
    return set_mask


# ---- tests -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_slicing_everything_kept_reproduces_model(attn, positions):
    base, proc = tiny("llava", "llama", gqa=True, attn=attn)
    model = copy.deepcopy(base)
    install_plan(model, FixedDrop(layer=1, every=None, positions=positions))
    inp = make_inputs(proc, (0, 1, 2, 3))
    ref = forward(base, inp).logits
    got = forward(model, inp).logits
    valid = inp["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    s_ref, l_ref, _ = generate(base, inp, 3)
    s_got, l_got, _ = generate(model, inp, 3)
    assert torch.equal(s_ref, s_got)
    torch.testing.assert_close(l_got, l_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm,gqa", [("llama", False), ("qwen2", True)])
def test_drop_in_place_equals_mask_variant(lm, gqa):
    """Kept tokens only ever see kept tokens with identical positions, so the last-token logits of the
    in-place drop equal those of masking the dropped tokens as keys in the full sequence."""
    base, proc = tiny("llava", lm, gqa=gqa)
    inp = make_inputs(proc, (0, 1, 2, 3))
    plan = FixedDrop(layer=2, every=3)
    model = copy.deepcopy(base)
    install_plan(model, plan)
    got = forward(model, inp).logits[:, -1]

    ref_model = copy.deepcopy(base)
    drop = plan.dropped(inp["input_ids"] == base.config.image_token_id)
    set_mask = mask_variant(ref_model, 2, drop)
    set_mask(inp["attention_mask"])
    ref = forward(ref_model, inp).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, forward(base, inp).logits[:, -1], atol=1e-4)


def test_cache_lengths_and_visual_log():
    model, proc = tiny("llava", "mistral", gqa=True)
    install_plan(model, FixedDrop(layer=2, every=2))
    inp = make_inputs(proc, (0, 1))
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    nv = int((inp["input_ids"][0] == model.config.image_token_id).sum())
    assert get_context(model).visual_tokens_per_layer == [nv, nv, nv // 2, nv // 2]
    lengths = [out.past_key_values.get_seq_length(i) for i in range(4)]
    assert lengths == [P, P, P - nv // 2, P - nv // 2]


@pytest.mark.slow
def test_decode_consistency_renumbered_positions():
    model, proc = tiny("llava", "llama")
    install_plan(model, FixedDrop(layer=1, every=2, positions="renumber"))
    check_decode_consistency(model, proc, steps=2)


def test_unequal_visual_counts_raise():
    model, proc = tiny("llava_next", "llama")
    install_plan(model, FixedDrop(layer=1, every=2))
    inp = make_inputs(proc, (0, 1), size={0: (64, 64), 1: (128, 64)})
    with pytest.raises(MethodError, match="different numbers of visual tokens"):
        forward(model, inp)


def test_install_twice_raises():
    model, _ = tiny("llava", "llama")
    install_plan(model, FixedDrop(layer=1))
    with pytest.raises(MethodError, match="already applied"):
        install_plan(model, FixedDrop(layer=1))
