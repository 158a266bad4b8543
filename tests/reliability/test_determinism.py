"""Determinism on CPU: the same config twice gives identical per-sample predictions and counted FLOPs,
and the calibration artefacts (ShortV Layer Contribution, RedundancyLens greedy ranking) are identical
when computed twice from scratch."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from harness.config import compose_config
from harness.runner import run_cell


def _cell(tiny_checkpoint, data_dir, store, *extra):
    return compose_config([
        f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={store}", "logger=none",
        "run.limit=3", "run.efficiency.enabled=true", "run.efficiency.probe_size=2", "run.efficiency.repeats=1",
        "run.efficiency.warmup=0", "run.efficiency.decode_tokens=2", *extra,
    ])


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=fastv"], ["method=random"]])
def test_same_config_twice_same_predictions_and_counted_flops(tiny_checkpoint, data_dir, tmp_path, method):
    from harness.runner import efficiency_fn

    a = run_cell(_cell(tiny_checkpoint, data_dir, tmp_path / "a", *method), efficiency_fn=efficiency_fn())
    b = run_cell(_cell(tiny_checkpoint, data_dir, tmp_path / "b", *method), efficiency_fn=efficiency_fn())
    assert a["key"] == b["key"] and not b.get("_reused")
    assert a["samples"] == b["samples"] and a["metrics"] == b["metrics"]
    fa, fb = a["efficiency"]["flops"], b["efficiency"]["flops"]
    assert fa["prefill"]["total"] > 0
    assert json.dumps(fa, sort_keys=True) == json.dumps(fb, sort_keys=True)
    assert a["efficiency"]["visual_tokens_llm"] == b["efficiency"]["visual_tokens_llm"]


# ---- calibration artefacts ---------------------------------------------------------------------------------
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Which letter is shown?"]


def _batches(processor):
    out = []
    for idx in ([0, 1], [2]):
        imgs = [Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")) for i in idx]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}],
            add_generation_prompt=True) for i in idx]
        out.append(dict(processor(images=imgs, text=texts, return_tensors="pt", padding=True)))
    return out


def _fresh_model(tiny_checkpoint):
    from harness.models.loading import load_model

    return load_model({"pretrained": tiny_checkpoint, "dtype": "float32", "attn_implementation": "sdpa"})


def test_shortv_layer_contribution_artefact_is_identical(tiny_checkpoint, tmp_path):
    from methods._shared.calibration import layer_contribution_artefact

    texts = []
    for run in ("first", "second"):  # two loads of the model, two empty caches
        model, processor, adapter = _fresh_model(tiny_checkpoint)
        art = layer_contribution_artefact(model, adapter, _batches(processor), model_id="tiny-test",
                                          data_id="rand3", n_samples=3, seed=0, cache_dir=tmp_path / run)
        assert art["path"].startswith(str(tmp_path / run))
        texts.append((tmp_path / run / art["path"].rsplit("/", 1)[1]).read_text())
    assert texts[0] == texts[1]
    data = json.loads(texts[0])
    assert sorted(data["ranking"]) == list(range(len(data["scores"])))


@pytest.mark.parametrize("reduction, params", [("ffn", {"ffn_keep": 0.25}), ("hollow", {})])
def test_redundancylens_greedy_ranking_is_identical(tiny_checkpoint, reduction, params):
    from methods._shared.calibration import greedy_layer_ranking
    from methods.redundancylens import kl_evaluator

    outs = []
    for _ in range(2):
        model, processor, adapter = _fresh_model(tiny_checkpoint)
        evaluate = kl_evaluator(model, adapter, _batches(processor), reduction, **params)
        outs.append(json.dumps(greedy_layer_ranking(adapter.num_layers if hasattr(adapter, "num_layers")
                                                    else len(adapter.llm_layers), evaluate, tail=1),
                               sort_keys=True))
    assert outs[0] == outs[1]
    assert sorted(json.loads(outs[0])["ranking"]) == list(range(len(json.loads(outs[0])["ranking"])))
