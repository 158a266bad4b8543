"""Every method on every prompt shape: several images per prompt (LLaVA-1.5, LLaVA-NeXT), LLaVA-NeXT
images of several sizes, llama / mistral / qwen2 language models.

* the budget rule per prompt (1-3 images, NeXT sizes) and counted == analytic FLOPs for every registered
  method: tests/methods/test_conformance.py;
* batches mixing image sizes: batch 8 gives the same predictions as batch 1 (the lmms-eval wrapper
  batches prompts of one visual shape together);
* log-likelihood scoring has the generation semantics: continuation log-probs equal those of
  generating after the context.
"""
from __future__ import annotations

import pytest
import torch

from harness.efficiency import flops as F
from tests.methods import helpers as S


def test_layouts_of_multi_image_prompts():
    """Several images: vision passes and newline images counted per prompt, the text between spans kept
    apart from the text after them."""
    proc = S.processor("llava_next")
    model = S.fresh_model("llava_next")
    sizes = [[(64, 64)], [(128, 128), (64, 128)], [(96, 64)]]
    layouts = F.layouts_from_inputs(model, S.inputs(proc, sizes))
    for lay, ss in zip(layouts, sizes):
        assert lay.n_images == len(ss)
        assert lay.images == sum(F.num_crops(model.config, list(s)) for s in ss)
        assert lay.visual == sum(F.visual_tokens_for_image(model.config, s) for s in ss)
        assert (lay.between > 0) == (len(ss) > 1)
    proc = S.processor("llava")
    (lay,) = F.layouts_from_inputs(S.fresh_model("llava"), S.inputs(proc, [[(64, 64)] * 3]))
    assert (lay.images, lay.n_images, lay.visual) == (3, 3, 192) and lay.between > 0


# ---- the lmms-eval wrapper: ragged batches and log-likelihood --------------------------------------------
_Req, _lmm = S.Req, S.wrapper


def _task(sizes):
    from tests.efficiency.helpers import image

    docs = [{"image": image(i, s), "q": q} for i, (s, q) in
            enumerate(zip(sizes, ["What is shown?", "How many circles are there?", "Is it red?", "Hi"] * 4))]
    return {"t": {"test": docs}}


NEXT_MIXED = [(64, 64), (128, 128), (64, 128), (64, 64), (128, 64), (96, 64), (128, 128), (64, 128)]


@pytest.mark.slow
@pytest.mark.parametrize("name", S.ALL_METHODS)
def test_ragged_next_batch8_equals_batch1(name):
    """LLaVA-NeXT prompts with images of five sizes (3 or 5 crops, different unpadded grids): batch 8 gives
    batch 1's answers for every method, at a token budget that really reduces."""
    task_dict = _task(NEXT_MIXED)
    reqs = [_Req(d["q"], {"max_new_tokens": 4, "until": []}, lambda doc: [doc["image"]], i, "t", "test")
            for i, d in enumerate(task_dict["t"]["test"])]
    answers = {}
    for bs in (1, 8):
        model, _ = S.applied(name, "llava_next", budget=0.3)
        lm = _lmm(model, S.processor("llava_next"), bs)
        lm.task_dict = task_dict
        batches = lm.shape_batches(reqs, list(range(len(reqs))), bs)
        assert bs == 1 or any(len(b) > 1 for b in batches)
        answers[bs] = lm.generate_until(reqs)
        assert lm.failures == {}, lm.failures
    assert answers[1] == answers[8]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("name", S.ALL_METHODS)
def test_loglikelihood_equals_generation(family, name):
    """Continuation log-probs of the one-forward log-likelihood path equal those of generating the
    continuation after the context (prefill of the context, then cached decode steps)."""
    from tests.efficiency.helpers import image

    model, _ = S.applied(name, family, budget=0.3)
    sizes = [(64, 128)] if family == "llava_next" else [(64, 64), (64, 64)]
    S.assert_loglikelihood_equals_generation(model, S.processor(family), [image(i, sz) for i, sz in enumerate(sizes)])


@pytest.mark.slow
@pytest.mark.parametrize("family, sizes", [("llava", [(64, 64), (64, 64)]), ("llava_next", [(64, 128), (96, 64)])],
                         ids=["llava-2img", "next-2img"])
@pytest.mark.parametrize("name", S.ALL_METHODS)
def test_cached_equals_uncached_on_multi_image_batches(name, family, sizes):
    """Several images per prompt, a left-padded batch of 2: cached greedy decoding equals recomputing
    every step without a cache (the generated tokens marked as continuation, so methods select from the
    last prompt token), and each sample equals its batch-1 run."""
    from methods._shared import llm_reduce as LR

    model, _ = S.applied(name, family, budget=0.3)
    proc = S.processor(family)
    texts = ["What is shown?", "How many circles are there in the image?"]
    batch = S.inputs(proc, [sizes, sizes], texts)
    assert int((batch["attention_mask"] == 0).sum()) > 0
    steps = 3
    seqs, logits, _ = S.generate(model, batch, steps)
    P = batch["input_ids"].shape[1]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for j in range(steps):
        ids = seqs[:, : P + j]
        mask = torch.cat([batch["attention_mask"], torch.ones(2, j, dtype=torch.long)], 1)
        with LR.continuation(model, j), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        torch.testing.assert_close(out, logits[:, j], atol=1e-4, rtol=1e-4)
    for b in range(2):
        one = S.inputs(proc, [sizes], [texts[b]], first=b)
        s1, l1, _ = S.generate(model, one, steps)
        torch.testing.assert_close(l1[0], logits[b], atol=1e-4, rtol=1e-4)
        assert torch.equal(s1[0, -steps:], seqs[b, -steps:])
