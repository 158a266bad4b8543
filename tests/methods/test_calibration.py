"""Calibration core: Layer Contribution (ShortV), greedy layer ranking (RedundancyLens), artefact cache."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import methods
from harness.models.adapter import get_adapter
from methods._shared.calibration import (
    config_hash, greedy_layer_ranking, layer_contribution, layer_contribution_artefact, load_or_compute,
    rank_layers, ranking_objective, select_samples,
)
from methods.base import MethodError
from tests.methods import helpers as H


@pytest.fixture(scope="module")
def tiny():
    return H.tiny("llava", "llama", num_layers=4)


def batch(proc, idx):
    """Left-padded processor inputs of samples `idx` (the first three questions of the helpers)."""
    imgs = [H.image(i, (64, 64)) for i in idx]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": H.QUESTIONS[i]}]}],
                                      add_generation_prompt=True) for i in idx]
    return dict(proc(images=imgs, text=texts, return_tensors="pt", padding=True))


@pytest.mark.slow
def test_layer_contribution_properties(tiny):
    model, proc = tiny
    model = copy.deepcopy(model)
    ad = get_adapter(model)
    batches = [batch(proc, [0, 1]), batch(proc, [2])]
    lc = layer_contribution(model, ad, batches, kind="visual")
    assert len(lc) == 4 and all(x >= 0 for x in lc)
    assert lc[-1] == 0.0  # visual updates of the last layer cannot reach the last token
    assert layer_contribution(model, ad, batches, kind="visual") == lc  # deterministic
    # batch composition does not matter (left padding + positions handled)
    singles = layer_contribution(model, ad, [batch(proc, [0]), batch(proc, [1]), batch(proc, [2])])
    np.testing.assert_allclose(singles, lc, rtol=1e-4, atol=1e-9)
    text = layer_contribution(model, ad, batches, kind="text")
    assert len(text) == 4 and all(x >= 0 for x in text) and text[-1] > 0  # last token itself frozen
    # the model is left unpatched
    ref = model(**batches[1]).logits
    assert torch.equal(ref, copy.deepcopy(model)(**batches[1]).logits)
    assert rank_layers(lc)[0] == 3


def test_layer_contribution_matches_shortv(tiny):
    """LC of layer i == KL of the ShortV model freezing only layer i (fast path)."""
    model, proc = tiny
    b = batch(proc, [1])
    lc = layer_contribution(copy.deepcopy(model), get_adapter(model), [b])
    with torch.no_grad():
        logp = torch.log_softmax(model(**b).logits[:, -1], -1)
        for i in (0, 2):
            m = copy.deepcopy(model)
            methods.build("shortv", {"layers": [i]}).apply(m, get_adapter(m))
            logq = torch.log_softmax(m(**b).logits[:, -1], -1)
            kl = float((logq.exp() * (logq - logp)).sum())
            assert kl == pytest.approx(lc[i], rel=1e-3, abs=1e-9)


def test_errors(tiny):
    model, proc = tiny
    ad = get_adapter(model)
    with pytest.raises(MethodError, match="empty"):
        layer_contribution(model, ad, [])
    with pytest.raises(MethodError, match="kind"):
        layer_contribution(model, ad, [batch(proc, [0])], kind="audio")
    right = batch(proc, [0, 1])
    right["attention_mask"] = right["attention_mask"].flip(-1)
    with pytest.raises(MethodError, match="left-padded"):
        layer_contribution(model, ad, [right])
    with pytest.raises(MethodError, match="empty"):
        select_samples(0, 3, seed=0)
    with pytest.raises(MethodError, match="only 5"):
        select_samples(5, 6, seed=0)
    m = copy.deepcopy(model)
    methods.build("shortv", {"layers": [1]}).apply(m, get_adapter(m))
    with pytest.raises(MethodError, match="unpatched"):
        layer_contribution(m, get_adapter(m), [batch(proc, [0])])


def test_select_samples_deterministic():
    a = select_samples(1000, 40, seed=7)
    assert a == select_samples(1000, 40, seed=7) and len(set(a)) == 40
    assert a != select_samples(1000, 40, seed=8)


def test_load_or_compute(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"scores": [0.3, 0.1, 0.2], "ranking": rank_layers([0.3, 0.1, 0.2])}

    parts = {"model_id": "m", "config_hash": "abc", "data_id": "d", "n_samples": 40, "seed": 0,
             "method": "shortv", "kind": "visual"}
    a = load_or_compute(parts, compute, tmp_path)
    b = load_or_compute(dict(reversed(list(parts.items()))), compute, tmp_path)  # key order irrelevant
    assert calls == [1] and a["ranking"] == b["ranking"] == [1, 2, 0]
    assert json.loads(open(a["path"]).read())["scores"] == [0.3, 0.1, 0.2]
    load_or_compute({**parts, "seed": 1}, compute, tmp_path)
    assert calls == [1, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(MethodError, match="lacks"):
        load_or_compute({**parts, "seed": 2}, lambda: {"scores": []}, tmp_path)


def test_artefact_feeds_shortv_auto(tiny, tmp_path):
    model, proc = tiny
    m0 = copy.deepcopy(model)
    kw = dict(model_id="tiny", data_id="unit", n_samples=2, seed=0, cache_dir=tmp_path)
    art = layer_contribution_artefact(m0, get_adapter(m0), [batch(proc, [0, 1])], **kw)
    again = layer_contribution_artefact(m0, get_adapter(m0), iter(()), **kw)  # cached: batches unused
    assert again["ranking"] == art["ranking"] and sorted(art["ranking"]) == [0, 1, 2, 3]
    assert art["key_parts"]["config_hash"] == config_hash(model.config)
    m = methods.build("shortv", {"layers": "auto", "N": 2, "calibration": art["path"]})
    m1 = copy.deepcopy(model)
    m.apply(m1, get_adapter(m1))
    assert m.frozen_layers(4) == art["ranking"][:2]


def test_greedy_layer_ranking():
    cost = {0: 0.05, 1: 0.01, 2: 0.03, 3: 0.01, 4: 0.02, 5: 0.5}
    seen = []

    def evaluate(layers):
        seen.append(tuple(layers))
        return {"a": 1.0 - sum(cost[i] for i in layers), "b": 2.0}

    out = greedy_layer_ranking(6, evaluate, tail=1)
    # tail pre-assigned; then ascending cost, ties -> deeper layer (3 before 1)
    assert out["ranking"] == [5, 3, 1, 4, 2, 0]
    assert seen[0] == () and len(seen) == 1 + 5 + 4 + 3 + 2 + 1
    stopped = greedy_layer_ranking(6, evaluate, tail=0, stop_at=2)
    assert stopped["ranking"][:2] == [3, 1] and stopped["ranking"][2:] == [5, 4, 2, 0]
    # penalty: drops weigh alpha times more than gains
    assert ranking_objective({"a": 0.9, "b": 1.1}, {"a": 1.0, "b": 1.0}, alpha=2.0) == pytest.approx(-0.05)
    with pytest.raises(MethodError, match="tail"):
        greedy_layer_ranking(4, evaluate, tail=5)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_reused_image_features_exact_and_scoped(family):
    """Within `reused_image_features` the image encoder runs once per batch (the calibrations ablate LLM
    layers only), the logits equal a fresh model's bit for bit, an input changed in place is encoded again,
    and afterwards the model encodes every call as before."""
    from methods._shared.calibration import reused_image_features
    from methods._shared.context import install_context
    from methods.redundancylens import kl_evaluator

    model, proc = H.tiny(family, "qwen2" if family == "qwen2_vl" else "llama")
    fresh = copy.deepcopy(model)
    ad = get_adapter(model)
    install_context(model, ad)
    before = vars(ad.base).get("get_image_features")
    calls = []
    handle = ad.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    b1 = dict(H.make_inputs(proc, (0, 1), H.sizes_of(family)))
    b2 = dict(H.make_inputs(proc, (2,), H.sizes_of(family)))
    with torch.no_grad():
        want1, want2 = fresh(**b1).logits, fresh(**b2).logits
        with reused_image_features(model, ad):
            for _ in range(3):
                assert torch.equal(model(**b1).logits, want1)
            n1 = len(calls)
            assert torch.equal(model(**b2).logits, want2)
            n2 = len(calls)
            assert torch.equal(model(**b1).logits, want1) and len(calls) == n2  # still cached
            b1["pixel_values"].mul_(0.5)  # changed in place: encoded again
            assert torch.equal(model(**b1).logits, fresh(**b1).logits)
            n3 = len(calls)
        model(**b1)
        model(**b1)
    handle.remove()
    assert n1 >= 1 and n2 == 2 * n1 and n3 == 3 * n1  # one encoder pass per batch (per crop pass of NeXT)
    assert len(calls) == 5 * n1  # after the block every call encodes again
    assert vars(ad.base).get("get_image_features") is before
    # the greedy ranking's evaluator gives the same numbers with and without the cache
    evaluate = kl_evaluator(fresh, get_adapter(fresh), [b2], "hollow", window=3)
    plain = [evaluate(layers) for layers in ([0], [1, 2], [3])]
    fresh2, _ = H.tiny(family, "qwen2" if family == "qwen2_vl" else "llama")
    with reused_image_features(fresh2, get_adapter(fresh2)):
        evaluate = kl_evaluator(fresh2, get_adapter(fresh2), [b2], "hollow", window=3)
        assert [evaluate(layers) for layers in ([0], [1, 2], [3])] == plain
