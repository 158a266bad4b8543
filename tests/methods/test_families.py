"""Every method on the new model families (tiny random Qwen2-VL and Qwen2.5-VL: GQA, M-RoPE, dynamic
resolution; Qwen2.5-VL with windowed ViT attention).

The shared properties (documented no-op, cached == uncached, batch == single, counted FLOPs == analytic,
one-line refusals) are checked for every registered method on every family it declares by the
conformance suite (tests/methods/test_conformance.py). Here: what is specific to these families. M-RoPE:
the kept tokens keep their three (temporal, height, width) positions (checked against the unpatched model
run on the kept tokens with their 3-D positions); renumbering refused; the layer methods and their
calibration on M-RoPE; the lmms-eval wrapper.

Prompts: two images of different sizes in one prompt (84x56 -> 6 visual tokens, not a square, and
64x64 -> 4), so the visual tokens form two spans with text between them.
"""
from __future__ import annotations

import pytest
import torch

import methods
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR
from tests.efficiency.helpers import image

QWEN = ["qwen2_vl", "qwen2_5_vl"]
FAMILIES = QWEN + ["llava_onevision"]
fam = pytest.mark.parametrize("family", FAMILIES)
qfam = pytest.mark.parametrize("family", QWEN)  # M-RoPE and dynamic-resolution specifics
SIZES = [(84, 56), (64, 64)]
#: methods that act on Qwen2-VL, with parameters that make them reduce on the 4-layer tiny LLM
ACTING = {
    "none": {},
    "random": {"keep": 4},
    "fastv": {"K": 1, "keep": 4},
    "ficoco_l": {"start_layer": 1, "final_tokens": 4},
    "shortv": {"layers": [3, 1]},
    "redundancylens": {"hollow_layers": [0, 2], "ffn_layers": [2, 3], "window": 3, "hollow_block": 2,
                       "ffn_keep": 0.25},
}
LAYER_ACTING = {k: ACTING[k] for k in ("shortv", "redundancylens")}


def model_and_processor(family):
    return build_tiny(family, gqa=True, vision_layers=3)


def prompt(proc, n_images: int, text: str = "What is shown?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(proc, texts, sizes=SIZES):
    imgs = [image(7 * b + i, s) for b in range(len(texts)) for i, s in enumerate(sizes)]
    prompts = [prompt(proc, len(sizes), t) for t in texts]
    return proc(images=imgs, text=prompts, return_tensors="pt", padding=len(texts) > 1)


def applied(name, family, params=None):
    model, proc = model_and_processor(family)
    m = methods.build(name, ACTING[name] if params is None else params)
    m.apply(model, get_adapter(model))
    return model, proc, m


@qfam
def test_tiny_qwen2_vl_has_gqa_mrope_and_dynamic_resolution(family):
    model, proc = model_and_processor(family)
    tc = model.config.text_config
    assert tc.num_key_value_heads < tc.num_attention_heads
    assert len(tc.rope_parameters["mrope_section"]) == 3
    inp = batch(proc, ["What is shown?"])
    counts = (inp["image_grid_thw"].prod(-1) // 4).tolist()
    assert counts == [6, 4]  # 6 is not a square; two image sizes in one prompt
    a = get_adapter(model)
    assert a.family == family and a.position_streams == 3
    assert a.projector is model.model.visual.merger


@qfam
def test_kept_tokens_keep_their_three_position_streams(family):
    """`random` drops visual tokens at the LLM input: the patched model's logits equal the unpatched
    language model run on the kept tokens only, with the kept tokens' 3-D (M-RoPE) position ids."""
    model, proc, _ = applied("random", family)
    inp = batch(proc, ["What is shown?"])
    with torch.no_grad():
        patched = model(**inp).logits[:, -1]
    kept = LR.get_reducer(model).state.cur  # [1, n'] prefill indices of the kept tokens
    assert kept.shape[1] == inp["input_ids"].shape[1] - 10 + 4
    ref_model, _ = model_and_processor(family)  # same seed: same weights, unpatched
    base = ref_model.model
    with torch.no_grad():
        pos3, _ = base.get_rope_index(inp["input_ids"], image_grid_thw=inp["image_grid_thw"],
                                      attention_mask=inp["attention_mask"], mm_token_type_ids=inp["mm_token_type_ids"])
        embeds = base.get_input_embeddings()(inp["input_ids"])
        feats = torch.cat(base.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((inp["input_ids"] == model.config.image_token_id)[..., None], feats)
        hidden = base.language_model(inputs_embeds=embeds[:, kept[0]], position_ids=pos3[:, :, kept[0]]).last_hidden_state
        ref = ref_model.lm_head(hidden[:, -1])
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    # the 3-D positions matter: with 1-D positions of the kept tokens the logits differ
    with torch.no_grad():
        flat = base.language_model(inputs_embeds=embeds[:, kept[0]], position_ids=kept).last_hidden_state
    assert not torch.allclose(ref_model.lm_head(flat[:, -1]), patched, atol=1e-4)


@pytest.mark.parametrize("name", ["random", "fastv", "ficoco_l"])
@qfam
def test_renumbered_positions_refused_on_mrope(name, family):
    model, _ = model_and_processor(family)
    m = methods.build(name, dict(ACTING[name], positions="renumber"))
    with pytest.raises(methods.MethodError, match="M-RoPE") as e:
        m.apply(model, get_adapter(model))
    assert "\n" not in str(e.value)


# ---- layer methods (ShortV, RedundancyLens) and their calibration ---------------------------------------


@pytest.mark.parametrize("name", list(LAYER_ACTING))
@fam
def test_layer_methods_change_the_output(name, family):
    """ShortV / RedundancyLens really act on Qwen2-VL (the equivalence tests above are not vacuous)."""
    ref_model, proc = model_and_processor(family)
    inp = batch(proc, ["What is shown?"])
    model, _, _ = applied(name, family)
    with torch.no_grad():
        assert not torch.allclose(model(**inp).logits[:, -1], ref_model(**inp).logits[:, -1], atol=1e-4)


@fam
def test_layer_contribution_on_mrope_padded_batch_equals_singles(family):
    """ShortV's Layer Contribution on Qwen2-VL: a left-padded batch gives the singles' scores (the model's
    own 3-D positions are kept; 1-D positions would replace M-RoPE), and LC_i is the KL of ShortV on i."""
    import numpy as np

    from methods._shared.calibration import layer_contribution

    model, proc = model_and_processor(family)
    texts = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]
    both = batch(proc, texts)
    singles = [proc(images=[image(7 * b + i, s) for i, s in enumerate(SIZES)], text=[prompt(proc, 2, t)],
                    return_tensors="pt") for b, t in enumerate(texts)]
    a = get_adapter(model)
    from methods._shared.calibration import _last_logprobs, _model_inputs

    padded = _last_logprobs(model, _model_inputs(both, a))  # the inputs calibration really runs
    for b, one in enumerate(singles):
        torch.testing.assert_close(padded[b], _last_logprobs(model, _model_inputs(one, a))[0], rtol=1e-4, atol=1e-4)
    lc = layer_contribution(model, a, [both])
    np.testing.assert_allclose(layer_contribution(model, a, singles), lc, rtol=1e-3, atol=1e-6)
    assert len(lc) == 4 and lc[-1] == 0.0 and max(lc) > 0
    with torch.no_grad():
        logp = torch.log_softmax(model(**singles[0]).logits[:, -1], -1)
        shortv, _ = model_and_processor(family)
        methods.build("shortv", {"layers": [1]}).apply(shortv, get_adapter(shortv))
        logq = torch.log_softmax(shortv(**singles[0]).logits[:, -1], -1)
    assert float((logq.exp() * (logq - logp)).sum()) == pytest.approx(layer_contribution(model, a, singles[:1])[1],
                                                                      rel=1e-3, abs=1e-9)


@fam
def test_redundancylens_ranking_runs_on_mrope(family):
    from methods._shared.calibration import greedy_layer_ranking
    from methods.redundancylens import kl_evaluator

    model, proc = model_and_processor(family)
    evaluate = kl_evaluator(model, get_adapter(model), [batch(proc, ["What is shown?"])], "hollow", window=3,
                            hollow_block=2)
    out = greedy_layer_ranking(4, evaluate, stop_at=2)
    assert sorted(out["ranking"]) == [0, 1, 2, 3] and out["base"]["agreement"] == 1.0


# ---- through the lmms-eval wrapper -------------------------------------------------------------------------
@fam
@pytest.mark.parametrize("name", ["none", "fastv", "redundancylens"])
def test_loglikelihood_equals_generation(name, family):
    """The wrapper's one-forward log-likelihood (Qwen: `mm_token_type_ids` extended over the continuation)
    equals generating the continuation after the context."""
    from tests.methods.helpers import assert_loglikelihood_equals_generation

    model, proc, _ = applied(name, family)
    assert_loglikelihood_equals_generation(model, proc, [image(i, s) for i, s in enumerate(SIZES)])


@fam
def test_wrapper_batches_by_visual_count(family):
    """Images of different sizes give different visual-token counts: the wrapper never batches them together,
    so a reducing method's batch answers equal batch 1's."""
    from tests.methods.helpers import Req as _Req, wrapper as _lmm

    sizes = [[(84, 56)], [(64, 64)], [(84, 56)], [(64, 64)]]
    task = {"t": {"test": [{"images": [image(i, s) for s in ss]} for i, ss in enumerate(sizes)]}}
    reqs = [_Req("What is shown?", {"max_new_tokens": 3, "until": []}, lambda d: d["images"], i, "t", "test")
            for i in range(len(sizes))]
    answers = {}
    for bs in (1, 4):
        model, proc, _ = applied("fastv", family, {"K": 1, "keep_ratio": 0.5})
        lm = _lmm(model, proc, bs)
        lm.task_dict = task
        batches = lm.shape_batches(reqs, list(range(len(reqs))), bs)
        assert bs == 1 or sorted(map(sorted, batches)) == [[0, 2], [1, 3]]
        answers[bs] = lm.generate_until(reqs)
        assert lm.failures == {}, lm.failures
    assert answers[1] == answers[4]
