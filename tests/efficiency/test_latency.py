"""`measure` returns a sane structure on a tiny model (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from harness.efficiency.latency import kv_cache_bytes, measure
from tests.efficiency.helpers import inputs_for, tiny


@pytest.mark.parametrize("family,batch", [("llava", 1), ("llava", 2), ("llava_next", 2)])
def test_measure_structure(family, batch):
    model, proc = tiny(family, "llama", True, "sdpa")
    texts = ("What is shown?", "Hi")[:batch]
    inputs = inputs_for(proc, texts)
    r = measure(model, inputs, warmup=1, repeats=2, decode_tokens=3)
    assert r["batch_size"] == batch and r["clock"] == "perf_counter"
    assert r["prefill_ms"]["n"] == 2 and r["decode_ms_per_token"]["n"] == 2 * 3
    for k in ("prefill_ms", "decode_ms_per_token"):
        st = r[k]
        assert st["min"] <= st["median"] <= st["max"] and st["iqr"] >= 0 and not math.isnan(st["median"])
    tc = model.config.text_config
    T = inputs["input_ids"].shape[1]
    head_dim = tc.hidden_size // tc.num_attention_heads
    expected = 2 * tc.num_hidden_layers * batch * tc.num_key_value_heads * T * head_dim * 4  # fp32
    assert r["kv_cache_bytes"] == expected
    assert r["kv_cache_lengths"] == [T] * tc.num_hidden_layers
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert r["visual_tokens_per_layer"] == [float(n_vis)] * tc.num_hidden_layers
    assert r["visual_tokens_source"] == "dense"
    mem = r["memory"]
    assert mem["kind"] == "cpu_rss_sampled" and mem["peak_bytes"] >= mem["before_bytes"] > 0
    assert mem["peak_delta_bytes"] >= 0


def test_kv_cache_bytes_uneven_layers():
    import torch
    from transformers import DynamicCache

    model, _ = tiny("llava", "llama", False, "sdpa")
    cache = DynamicCache(config=model.config.text_config)
    for i, n in enumerate([5, 3, 3, 1]):
        k = torch.zeros(1, 4, n, 16)
        cache.update(k, k.clone(), i)
    assert kv_cache_bytes(cache) == 2 * (5 + 3 + 3 + 1) * 4 * 16 * 4


def test_measure_bad_args():
    model, proc = tiny("llava", "llama", False, "sdpa")
    with pytest.raises(ValueError):
        measure(model, inputs_for(proc), repeats=0)

