"""Counted FLOPs (fvcore on the real, possibly patched model) == analytic formulas, on tiny models."""
from __future__ import annotations

import pytest

from harness.efficiency import analytic as A
from harness.efficiency import flops as F
from tests.efficiency.helpers import inputs_for, tiny

CASES = [
    ("llava", "llama", False, "sdpa"),
    ("llava", "llama", False, "eager"),
    ("llava", "mistral", True, "sdpa"),
    ("llava", "qwen2", True, "sdpa"),
    ("llava", "qwen2", True, "eager"),
    ("llava_next", "llama", True, "sdpa"),
    ("llava_next", "mistral", False, "eager"),
]


@pytest.mark.parametrize("family,lm,gqa,attn", CASES)
def test_prefill_and_decode_counted_equal_analytic(family, lm, gqa, attn):
    model, proc = tiny(family, lm, gqa, attn)
    inputs = inputs_for(proc)
    layout = F.layouts_from_inputs(model, inputs)[0]
    if family == "llava_next":
        assert layout.images == F.num_crops(model.config, inputs["image_sizes"][0].tolist()) > 1

    pre = F.count_prefill(model, inputs)
    assert pre.phase == "prefill" and pre.counter == "fvcore" and pre.source == "counted"
    assert pre.unsupported_ops == {}, pre.unsupported_ops
    ana = F.analytic_prefill(model.config, layout)
    # every component, vision and projector included (the last CLIP layer runs and is counted)
    assert pre.flops == ana
    assert pre.total == sum(ana.values())

    dec = F.count_decode(model, inputs)
    assert dec.context == layout.total
    assert dec.unsupported_ops == {}
    assert dec.flops == F.analytic_decode(model.config, dec.context)


def test_vision_counts_every_clip_layer():
    """fvcore's jit trace would drop the last CLIP layer (unused with vision_feature_layer=-2)."""
    model, proc = tiny("llava", "llama", False, "sdpa")
    pre = F.count_prefill(model, inputs_for(proc))
    v = A.ViTShape.from_config(model.config.vision_config)
    assert model.config.vision_feature_layer == -2
    assert pre.flops["vision"] == 2 * A.vit_macs(v, v.layers)
    assert pre.flops["vision"] != 2 * A.vit_macs(v, v.layers - 1)


def test_fvcore_and_flop_counter_mode_agree():
    model, proc = tiny("llava", "qwen2", True, "sdpa")
    inputs = inputs_for(proc)
    a = F.count_prefill(model, inputs)
    b = F.count_prefill(model, inputs, counter="flop_counter_mode")
    assert b.counter == "flop_counter_mode"
    assert a.flops == b.flops
    assert F.count_decode(model, inputs).flops == F.count_decode(model, inputs, counter="flop_counter_mode").flops
    p, d = F.count_prefill_and_decode(model, inputs, counter="flop_counter_mode")
    assert p.flops == a.flops and d.flops == F.count_decode(model, inputs).flops and d.context == p.seq_len


def test_logits_to_keep_all_positions():
    model, proc = tiny("llava", "llama", False, "sdpa")
    inputs = inputs_for(proc)
    T = inputs["input_ids"].shape[1]
    pre = F.count_prefill(model, inputs, logits_to_keep=0)  # 0 = every position
    s = A.LLMShape.from_config(model.config.text_config)
    assert pre.flops["lm_head"] == 2 * A.lm_head_macs(s, T)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batch_with_left_padding(family):
    model, proc = tiny(family, "llama", True, "sdpa")
    texts = ("What is shown?", "Hi", "How many circles squares triangles are there?", "Is it red?")
    inputs = inputs_for(proc, texts)
    B, T = inputs["input_ids"].shape
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding present
    pre = F.count_prefill(model, inputs)
    s = A.LLMShape.from_config(model.config.text_config)
    assert pre.batch_size == B and pre.seq_len == T
    assert pre.flops["llm"] == B * 2 * A.llm_prefill_macs(s, T)  # padding tokens are computed too
    assert pre.flops["lm_head"] == B * 2 * A.lm_head_macs(s, 1)
    layouts = F.layouts_from_inputs(model, inputs)
    assert [l.text for l in layouts] != [layouts[0].text] * B  # per-sample layouts, padding excluded
    ana = [F.analytic_prefill(model.config, l) for l in layouts]
    assert pre.flops["vision"] == sum(a["vision"] for a in ana)
    assert pre.flops["projector"] == sum(a["projector"] for a in ana)
    dec = F.count_decode(model, inputs)
    assert dec.flops["llm"] == B * 2 * A.llm_decode_macs(s, T)


def test_patched_instance_is_counted():
    """Counting sees what the patched instance really runs: a layer replaced by identity vanishes."""
    from harness.models.tiny import build_tiny

    model, proc = build_tiny("llava", "llama")
    inputs = inputs_for(proc)
    before = F.count_prefill(model, inputs).flops["llm"]
    layer = model.model.language_model.layers[1]
    layer.forward = lambda hidden_states, *a, **k: hidden_states
    after = F.count_prefill(model, inputs).flops["llm"]
    s = A.LLMShape.from_config(model.config.text_config)
    T = inputs["input_ids"].shape[1]
    assert before - after == 2 * A.llm_layer_macs(s, T)


def test_flopscount_dict_roundtrip():
    model, proc = tiny("llava", "llama", False, "sdpa")
    c = F.count_prefill(model, inputs_for(proc))
    d = c.to_dict()
    assert d["total"] == c.total and d["flops"] == c.flops and d["phase"] == "prefill"
    assert c.macs == {k: v // 2 for k, v in c.flops.items()}


def test_sdpa_macs_gqa_formula():
    # B=2, Hq=8, Lq=5, Lk=7, d=16; key/value with 2 heads (GQA): counted with the query heads
    assert F.sdpa_macs([2, 8, 5, 16], [2, 2, 7, 16], [2, 2, 7, 16]) == 2 * 8 * 5 * 7 * (16 + 16)
    # HF's pack_gqa decode layout: (B, Hkv, n_rep, d) queries
    assert F.sdpa_macs([2, 2, 4, 16], [2, 2, 7, 16], [2, 2, 7, 16]) == 2 * 8 * 1 * 7 * 32


def test_next_visual_tokens_match_processor():
    model, proc = tiny("llava_next", "llama", False, "sdpa")
    for size in [(64, 64), (64, 40), (40, 64), (100, 130), (128, 128)]:
        inputs = inputs_for(proc, sizes=[size])
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert F.visual_tokens_for_image(model.config, size) == n, size
        assert F.layouts_from_inputs(model, inputs)[0].images == F.num_crops(model.config, list(size))


def test_counts_with_registered_methods_if_present():
    """Counted == the method's own analytic formula for the reducing methods available."""
    import methods

    model, proc = tiny("llava", "llama", False, "sdpa")
    inputs = inputs_for(proc)
    layout = F.layouts_from_inputs(model, inputs)[0]
    if "none" not in methods.available():
        pytest.skip("no methods registered")
    m = methods.build("none", {})
    assert F.count_prefill(model, inputs).flops == F.analytic_prefill(model.config, layout, m)


def test_analytic_fallback_is_labelled():
    model, proc = tiny("llava", "llama", False, "sdpa")
    inputs = inputs_for(proc)
    layout = F.layouts_from_inputs(model, inputs)[0]
    a = F.analytic_count(model.config, layout)
    assert a.source == "analytic" and a.counter == "analytic"
    assert a.flops == F.count_prefill(model, inputs).flops
    d = F.analytic_count(model.config, layout, phase="decode")
    assert d.flops == F.count_decode(model, inputs).flops and d.context == layout.total


def test_decode_with_pruned_cache_matches_per_layer_analytic():
    """A method that shrinks some layers' KV cache (FastV) is counted with the real per-layer lengths."""
    import methods
    from harness.models import get_adapter
    from harness.models.tiny import build_tiny

    if "fastv" not in methods.available():
        pytest.skip("fastv not available")
    model, proc = build_tiny("llava", "llama", gqa=True)
    m = methods.build("fastv", {"K": 2, "R": 0.5})
    adapter = get_adapter(model)
    m.validate(adapter)
    model = m.apply(model, adapter) or model
    dec = F.count_decode(model, inputs_for(proc))
    assert len(set(dec.kv_lengths)) == 2  # full cache before layer K, pruned after
    assert dec.flops == F.analytic_decode(model.config, dec.context, kv_lengths=dec.kv_lengths)
    assert dec.flops != F.analytic_decode(model.config, dec.context)


@pytest.mark.parametrize("family,lm", [("llava", "qwen2"), ("llava_next", "llama")])
def test_formula_mode_total_equals_flop_counter_mode(family, lm):
    """The meta-path counter applies torch's FLOP formulas without FlopCounterMode's per-module
    bookkeeping; its total must equal FlopCounterMode's own on the same forward (given the same CPU
    flash-SDPA formula, which torch's table lacks)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, proc = tiny(family, lm, True, "sdpa")
    inputs = inputs_for(proc)
    ours = F.count_prefill(model, inputs, counter="flop_counter_mode", logits_to_keep=0)
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: F._fcm_sdpa_cpu}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa) as fcm:
        model(**inputs, logits_to_keep=0)
    assert ours.total == fcm.get_total_flops() > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_counts_depend_on_the_token_layout_only(family):
    """The efficiency probe counts each token layout once (`measure_inputs`): for every method, two prompts
    of one layout with different images (so different kept/merged tokens) count the same FLOPs."""
    import copy

    import methods
    from harness.efficiency import flops as F
    from harness.models.adapter import get_adapter
    from tests.efficiency.helpers import image, prompt

    model, processor = tiny(family, "llama")
    settings = {"random": {"keep_ratio": 0.3}, "fastv": {"K": 1, "R": 0.5}, "tome": {"tokens": 20},
                "ficoco_v": {"tokens": 20, "start_layer": 1}, "ficoco_l": {"final_tokens": 20, "start_layer": 1},
                "ficoco_vl": {"tokens": 20}, "shortv": {"layers": [1, 2]},
                "redundancylens": {"hollow_layers": [1], "ffn_layers": [2], "window": 8}}
    for name, params in settings.items():
        try:
            m = methods.build(name, params)
            patched = copy.deepcopy(model)
            adapter = get_adapter(patched)
            m.validate(adapter)
        except Exception:  # a setting this tiny family does not take: covered by the method's own tests
            continue
        m.apply(patched, adapter)
        counts = []
        for seed in (1, 2):
            inputs = processor(images=image(seed), text=prompt(processor), return_tensors="pt")
            counts.append((F.count_prefill(patched, inputs).total, F.count_decode(patched, inputs).total))
        assert counts[0] == counts[1], (name, counts)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("method,params", [("none", {}), ("fastv", {"K": 1, "R": 0.5})])
def test_decode_is_counted_on_the_other_families(family, method, params):
    """The decode step is `generate`'s own (its keyword inputs and cache): Qwen2-VL / Qwen2.5-VL need their
    3D M-RoPE positions from the stored rope deltas, which a bare (new token, extended mask) forward does
    not give (it failed under fvcore: the decode FLOPs of these families were "not counted"). Batch 1 and
    a left-padded batch of 2 (two prompts of different lengths), with a method that prunes the cache."""
    import methods
    from harness.models import get_adapter
    from harness.models.tiny import build_tiny

    if method not in methods.available():
        pytest.skip(f"{method} not available")
    model, proc = build_tiny(family)
    m = methods.build(method, params)
    adapter = get_adapter(model)
    m.validate(adapter)
    model = m.apply(model, adapter) or model
    one = F.count_decode(model, inputs_for(proc))
    assert one.source == "counted" and one.unsupported_ops == {}
    assert one.flops == F.analytic_decode(model.config, one.context, kv_lengths=one.kv_lengths)
    assert (len(set(one.kv_lengths)) == 2) == (method == "fastv")  # FastV's pruned cache is what is counted
    two = F.count_decode(model, inputs_for(proc, texts=("What is shown?", "How many circles are in it?")))
    per_sample = F.analytic_decode(model.config, two.context, kv_lengths=two.kv_lengths)
    assert two.batch_size == 2 and two.flops == {k: 2 * v for k, v in per_sample.items()}
