"""`random` with `per_sample=true` (the default): a fresh subset per sample, seeded by the method's seed
and the sample's document (its own prompt ids and image pixels, methods/_shared/document.py).

Checked against a plain reference written here (SHA-256 over the tag, the seed, the sample's unpadded
prompt ids and its pixel values as float32, then Python's `random.Random(...).sample`): the subsets
differ across samples and seeds, are identical for a sample alone and at any position of a left-padded
batch (LLaVA and the packed Qwen2-VL rows), identical between the cached prefill and every uncached
forward over prompt + generated tokens, and a changed image alone changes the subset."""
from __future__ import annotations

import hashlib
import random

import pytest
import torch

import methods
from harness.models.adapter import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.document import _strip_zero_crops
from tests.methods.helpers import check_uncached, forward, generate, make_inputs, tiny


def reference_subset(ids_row, pixels: list[torch.Tensor], seed: int, n: int, k: int) -> list[int]:
    """Plain reference: the visual ordinals kept for one sample given alone (no padding)."""
    h = hashlib.sha256(b"vtbench-document-v1")
    h.update(int(seed).to_bytes(8, "little"))
    tok = [int(t) for t in ids_row]
    h.update(len(tok).to_bytes(8, "little") + b"".join(t.to_bytes(8, "little", signed=True) for t in tok))
    for x in pixels:
        x = x.float().contiguous()
        h.update(str(tuple(x.shape)).encode() + x.numpy().tobytes())
    return sorted(random.Random(int.from_bytes(h.digest()[:8], "little")).sample(range(n), k))


def kept_ordinals(model, inp, layer=0) -> list[list[int]]:
    """Per sample: the visual ordinals alive after the reducer's drop at `layer` (from the state)."""
    st = LR.get_reducer(model).state
    visual = inp["input_ids"] == model.config.image_token_id
    out = []
    for b in range(visual.shape[0]):
        ordinal = visual[b].long().cumsum(0) - 1
        idx = st.cache_idx[layer][b]
        out.append([int(ordinal[i]) for i in idx if visual[b, i]])
    return out


def build(model, **params):
    m = methods.build("random", params)
    m.apply(model, get_adapter(model))
    return model


@pytest.mark.parametrize("seed", [0, 7])
def test_subsets_follow_the_reference_and_are_batch_invariant(seed):
    model, proc = tiny("llava", "llama")
    build(model, keep=10, seed=seed)
    batch = make_inputs(proc, (0, 1, 2, 3))
    assert int((batch["attention_mask"] == 0).sum()) > 0  # really padded
    forward(model, batch)
    in_batch = kept_ordinals(model, batch)
    for b in range(4):
        one = make_inputs(proc, (b,))
        forward(model, one)
        alone = kept_ordinals(model, one)[0]
        ref = reference_subset(one["input_ids"][0], [one["pixel_values"][0]], seed, 64, 10)
        assert alone == ref == in_batch[b]
    # reversed order: the same sample at another batch position keeps the same subset
    rev = make_inputs(proc, (3, 2, 1, 0))
    forward(model, rev)
    assert kept_ordinals(model, rev) == in_batch[::-1]
    assert len({tuple(s) for s in in_batch}) == 4  # a fresh subset per sample


def test_seed_and_image_change_the_subset_and_per_sample_false_does_not_vary():
    model, proc = tiny("llava", "llama")
    inp = make_inputs(proc, (0,))
    subsets = {}
    for seed in range(4):
        m = build(tiny("llava", "llama")[0], keep=10, seed=seed)
        forward(m, inp)
        subsets[seed] = tuple(kept_ordinals(m, inp)[0])
    assert len(set(subsets.values())) == 4
    # same prompt ids, another image: another subset (the image is part of the document)
    m = build(tiny("llava", "llama")[0], keep=10, seed=0)
    other = dict(inp, pixel_values=inp["pixel_values"] + 0.5)
    forward(m, other)
    assert tuple(kept_ordinals(m, other)[0]) != subsets[0]
    # per_sample=false: every sample keeps the seed's one subset
    m = build(model, keep=10, seed=0, per_sample=False)
    batch = make_inputs(proc, (0, 1, 2))
    forward(m, batch)
    from methods.random_drop import random_subset

    assert kept_ordinals(m, batch) == [random_subset(64, 10, 0).tolist()] * 3


def test_cached_prefill_and_uncached_forwards_use_the_same_subset():
    """Greedy decoding cached == uncached over prompt + generated tokens (the prompt pinned), and the
    uncached forwards' kept ordinals equal the prefill's (the generated tokens are not in the document)."""
    model, proc = tiny("llava", "qwen2", gqa=True)
    build(model, keep_ratio=0.25)
    inp = make_inputs(proc, (0, 1, 2, 3))
    seqs, logits, _ = generate(model, inp, 3)
    prefill = kept_ordinals(model, inp)
    check_uncached(model, inp, seqs, logits)
    P = inp["input_ids"].shape[1]
    LR.pin_prompt_length(model, P)
    ids = seqs[:, : P + 2]
    mask = torch.cat([inp["attention_mask"], torch.ones(4, 2, dtype=torch.long)], 1)
    forward(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": inp["pixel_values"]}, use_cache=False)
    LR.pin_prompt_length(model, None)
    assert kept_ordinals(model, {"input_ids": ids}) == prefill


def test_qwen2_vl_packed_pixels_batch_invariant():
    """Qwen2-VL packs every image's patch rows into one tensor: each sample's rows are found from
    `image_grid_thw`, so a sample alone and inside a padded batch keeps the same subset."""
    model, proc = tiny("qwen2_vl", "qwen2", gqa=True)
    build(model, keep_ratio=0.5)
    batch = make_inputs(proc, (0, 1, 2), size=(112, 112))
    assert int((batch["attention_mask"] == 0).sum()) > 0
    forward(model, batch)
    in_batch = kept_ordinals(model, batch)
    for b in range(3):
        one = make_inputs(proc, (b,), size=(112, 112))
        forward(model, one)
        alone = kept_ordinals(model, one)[0]
        n = int((one["input_ids"] == model.config.image_token_id).sum())
        ref = reference_subset(one["input_ids"][0], [one["pixel_values"]], 0, n, n // 2)
        assert alone == ref == in_batch[b]
    assert len({tuple(s) for s in in_batch}) == 3


def test_crop_padding_is_not_part_of_the_document():
    x = torch.randn(3, 2, 4, 4)
    padded = torch.cat([x, torch.zeros(2, 2, 4, 4)])
    assert torch.equal(_strip_zero_crops(padded), x) and torch.equal(_strip_zero_crops(x), x)
