"""Full-size LLaVA-1.5 / LLaVA-NeXT architectures counted on the meta device (no weights)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.efficiency import analytic as A
from harness.efficiency import flops as F
from harness.models.loading import config_from_cfg, meta_model

CONF = Path(__file__).resolve().parents[2] / "conf"


def _config(name):
    return config_from_cfg(OmegaConf.load(CONF / "model" / f"{name}.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava15_7b", "llava15_13b", "llava_next_7b", "llava_next_13b", "qwen2_vl_7b", "qwen2_5_vl_7b", "llava_onevision_7b"])
def test_meta_count_equals_analytic(name):
    t0 = time.perf_counter()
    config = _config(name)
    model = meta_model(config)
    inputs = F.synthetic_inputs(config)
    layout = F.synthetic_layout(config)
    pre, dec = F.count_prefill_and_decode(model, inputs)
    assert pre.counter == "flop_counter_mode" and pre.source == "counted"
    assert pre.flops == F.analytic_prefill(config, layout)
    assert dec.context == layout.total
    assert dec.flops == F.analytic_decode(config, layout.total)
    assert time.perf_counter() - t0 < 60  # seconds, generous: a loaded 2-core machine
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 1024 * 1024  # KiB -> < 4 GiB


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("llava15_13b", "none"), ("llava15_7b", "tome"),
                                         ("llava15_7b", "ficoco_v"), ("llava_next_7b", "none")])
def test_meta_op_cache_answers_as_the_kernels_do(name, method, monkeypatch):
    """The meta-device op cache (shape, strides and dtype of functional ops' outputs, learnt from the
    first call) gives every later call what the op's own meta kernel gives, through whole forwards
    (prefill with the vision tower and merging, decode): with `check_meta_cache` every hit also runs the
    kernel and compares; the counts are the same with the cache in use."""
    import methods
    from harness.models import get_adapter

    config = _config(name)
    counts = []
    for check in (True, False):
        monkeypatch.setattr(F, "_META_OUT", {})
        monkeypatch.setattr(F._FlopFormulaMode, "check_meta_cache", check)
        model = meta_model(config)
        m = methods.build(method, {"tokens": 192} if method != "none" else {})
        model = m.apply(model, get_adapter(model)) or model
        hits = F.META_CACHE_STATS["hits"]
        pre, dec = F.count_prefill_and_decode(model, F.synthetic_inputs(config))
        assert F.META_CACHE_STATS["hits"] - hits > 1000  # the decoder layers repeat their ops' metadata
        counts.append((pre.flops, dec.flops, dec.kv_lengths))
    assert counts[0] == counts[1]
    layout = F.synthetic_layout(config)
    assert sum(counts[0][0].values()) == sum(F.analytic_prefill(config, layout, None if method == "none" else m).values())


def test_meta_cache_keys_and_functional_ops():
    import torch

    aten = torch.ops.aten
    assert F._functional(aten.mul.Tensor) and F._functional(aten.native_layer_norm.default)
    assert not F._functional(aten.mul_.Tensor)  # in-place
    assert not F._functional(aten.view.default) and not F._functional(aten.transpose.int)  # views alias
    assert not F._functional(aten.add.out)  # writes into out=
    a = torch.empty(2, 3, device="meta")
    k = F._meta_key(aten.mul.Tensor, (a, 2.0), {})
    assert k == F._meta_key(aten.mul.Tensor, (torch.empty(2, 3, device="meta"), 2.0), {})
    assert k != F._meta_key(aten.mul.Tensor, (a, 2), {})  # a Python int and a float may promote differently
    assert k != F._meta_key(aten.mul.Tensor, (a.t(), 2.0), {})  # strides are part of the key
    assert k != F._meta_key(aten.mul.Tensor, (a.double(), 2.0), {})
    assert F._meta_key(aten.mul.Tensor, (torch.ones(2, 3), 2.0), {}) is None  # real values: never cached
    out = F._make_outputs(F._meta_outputs(torch.empty(4, 5, device="meta").t()))
    assert out.shape == (5, 4) and out.stride() == (1, 5) and out.device.type == "meta"


def test_llava15_7b_env_spec_numbers():
    """env spec §4: 1 + 576 + 63 = 640 tokens; LLM 8.5040e12, vision 3.8192e11, projector 2.4159e10."""
    config = _config("llava15_7b")
    model = meta_model(config)
    pre = F.count_prefill(model, F.synthetic_inputs(config))
    assert pre.flops["llm"] == 8_504_035_246_080
    assert round(pre.flops["vision"] / 1e11, 4) == 3.8192
    assert round(pre.flops["projector"] / 1e10, 4) == 2.4159
    s = A.LLMShape.from_config(config.text_config)
    assert pre.flops["lm_head"] == 2 * s.hidden * s.vocab  # last position only
    dec = F.count_decode(model, F.synthetic_inputs(config))  # the separate decode path on meta
    assert dec.context == 640 and dec.flops == F.analytic_decode(config, 640)


def test_next_layout_672():
    config = _config("llava_next_7b")
    layout = F.synthetic_layout(config)
    assert F.default_image_hw(config) == (672, 672)
    # base 576 + 2x2 grid of 24x24 patches (48 x 48) + 48 newline tokens; 5 encoder passes
    assert layout.visual == 576 + 48 * 48 + 48 and layout.images == 5
    assert F.synthetic_layout(config, image_hw=(336, 672)).images == 3


def test_meta_inputs_have_no_values():
    config = _config("llava15_7b")
    with pytest.raises(ValueError, match="synthetic_layout"):
        F.layouts_from_inputs(config, F.synthetic_inputs(config))
