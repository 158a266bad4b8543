"""Each new model family end to end through the same runner as LLaVA (`vtbench model=tiny_<family>
benchmark=shapes run.limit=N`): a tiny random checkpoint saved to a folder, loaded, evaluated with lmms-eval,
measured and recorded, with and without a reduction method."""
from __future__ import annotations

import json

import pytest

from harness.cli.main import run_one


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [
    ("qwen2_vl", "fastv"), ("qwen2_5_vl", "redundancylens"), ("llava_onevision", "random"),
])
def test_family_runs_end_to_end(family, method, data_dir, tmp_path, capsys):
    from harness.models.tiny import save_tiny

    ckpt = save_tiny(family, tmp_path / family)
    store = tmp_path / "store"
    base = [f"model=tiny_{family}", f"model.pretrained={ckpt}", f"data_dir={data_dir}", f"store.dir={store}",
            "logger=none", "run.limit=4", "run.batch_size=2", "run.efficiency.probe_size=1",
            "run.efficiency.repeats=1"]
    extra = {"fastv": ["budget.kind=tokens", "budget.value=0.3"], "random": ["budget.kind=tokens", "budget.value=0.3"],
             "redundancylens": ["method.params.hollow_layers=[0]", "method.params.ffn_layers=[1]"]}[method]
    for args in (base, base + [f"method={method}", *extra]):
        rc = run_one(args)
        assert rc == 0, capsys.readouterr().err[-3000:]
    recs = {r["cell"]["method"]["name"]: r for r in (json.loads(p.read_text()) for p in (store / "records").glob("*.json"))}
    assert set(recs) == {"none", method}
    for rec in recs.values():
        assert rec["status"] == "complete" and rec["n_samples"] == 4 and rec["n_failed"] == 0
        assert rec["efficiency"]["flops"]["counted_equals_analytic"], rec["efficiency"]["flops"]
        # the decode step is counted on every family (Qwen's M-RoPE decode inputs come from generate)
        fl = rec["efficiency"]["flops"]
        assert fl["decode_source"] == "counted", fl["decode_source"]
        assert fl["decode_per_token"]["total"] == fl["analytic_decode_per_token"]["total"] > 0
    assert recs[method]["efficiency"]["flops"]["prefill"]["total"] < recs["none"]["efficiency"]["flops"]["prefill"]["total"]
