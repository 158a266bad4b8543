"""Batched evaluation: batch 8 (left padding) gives the same predictions as batch 1, through the whole
lmms-eval path (`run_cell` -> simple_evaluate -> VTBenchLMM), for `none` and every method at a budget that
really reduces on the tiny random checkpoint (64 visual tokens, 3 CLIP layers, 4 LLM layers)."""
from __future__ import annotations

import pytest

from harness.config import compose_config
from harness.lmms_model import VTBenchLMM
from harness.runner import run_cell

BUDGET = ["budget.kind=tokens", "budget.value=0.33"]  # 21 of 64 visual tokens reach the LLM
CASES = {
    "none": [],
    "random": BUDGET,
    "fastv": BUDGET,
    # 2 useful CLIP layers: bipartite matching cannot merge down to 21 tokens, 32 (value 0.5) it can
    "tome": ["budget.kind=tokens", "budget.value=0.5"],
    "ficoco_v": ["method.params.start_layer=1"] + BUDGET,
    "ficoco_l": ["method.params.start_layer=2"] + BUDGET,
    "ficoco_vl": ["++method.params.vision_params.start_layer=1", "++method.params.llm_params.start_layer=2"] + BUDGET,
    "shortv": ["method.params.layers=[3,1]"],
    "redundancylens": ["method.params.hollow_layers=[2,3]", "method.params.ffn_layers=[1,3]", "method.params.window=16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_batch8_equals_batch1(method, cell_overrides, monkeypatch):
    padded = []
    real_encode = VTBenchLMM.encode

    def encode(self, contexts, visuals):
        out = real_encode(self, contexts, visuals)
        padded.append((len(contexts), bool((out["attention_mask"] == 0).any())))
        return out

    monkeypatch.setattr(VTBenchLMM, "encode", encode)
    base = [o for o in cell_overrides if not o.startswith("logger.")]
    base += [f"method={method}", "run.limit=8", "logger=none"] + CASES[method]
    one = run_cell(compose_config(base + ["run.batch_size=1"]))
    eight = run_cell(compose_config(base + ["run.batch_size=8"]))
    assert one["status"] == eight["status"] == "complete"
    assert one["key"] != eight["key"]  # the batch size is part of the cell
    assert one["n_failed"] == eight["n_failed"] == 0
    # the batch-8 run really batched all 8 prompts together, with left padding
    assert (8, True) in padded and any(n == 1 for n, _ in padded)
    # the method really reduces: the budget maps to 21 visual tokens per prompt (ToMe: 32), or explicit
    # layer lists are set
    if "budget.kind=tokens" in CASES[method]:
        value = float(CASES[method][-1].split("=")[1])
        k = round(64 * value)
        assert one["budget"]["visual_tokens"] == one["budget"]["visual_tokens_to_llm"] == k < 64
        assert value in one["method_params"].values()  # a share of every prompt's visual tokens
    elif method != "none":
        assert any(isinstance(v, list) and v for v in one["method_params"].values())
    p1 = [(s["doc_id"], s["prediction"]) for s in one["samples"]]
    p8 = [(s["doc_id"], s["prediction"]) for s in eight["samples"]]
    assert len(p1) == 8 and p1 == p8
