"""One cell end to end through lmms-eval on a tiny random checkpoint: record, reuse, W&B, resume."""
import glob
import os
import subprocess
import sys

import pytest

from harness.config import compose_config
from harness.results import ResultsStore, load
from harness.runner import run_cell


def test_cell_end_to_end_and_reuse(cell_overrides, tmp_path, monkeypatch):
    cfg = compose_config(cell_overrides)
    rec = run_cell(cfg)
    assert rec["status"] == "complete" and rec["n_samples"] == 4
    assert 0.0 <= rec["accuracy"] <= 1.0
    assert rec["n_failed"] == 0
    assert [s["doc_id"] for s in rec["samples"]] == [0, 1, 2, 3]
    assert all("prediction" in s and "target" in s for s in rec["samples"])
    env = rec["environment"]
    assert env["versions"]["transformers"] and env["versions"]["lmms_eval"] == "0.7.3"
    assert "sha" in env["git"] and "dirty" in env["git"]
    assert rec["data"]["dataset"]["meta"]["sha256"]["test"]
    df = load(cfg.store.dir)
    assert list(df["key"]) == [rec["key"]]

    # W&B offline run holds the config and the summary metrics of the cell
    wandb_file = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(wandb_file) == 1
    blob = open(wandb_file[0], "rb").read()
    for needle in [rec["key"], "metrics/exact_match", "n_samples", os.path.basename(cfg.model.pretrained)]:
        assert needle.encode() in blob, needle

    # the same cell again: reused, no model load, no evaluation
    import harness.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("model loaded for a complete cell")

    monkeypatch.setattr(loading, "load_model", boom)
    again = run_cell(compose_config(cell_overrides))
    assert again.get("_reused") and again["key"] == rec["key"]
    monkeypatch.undo()
    forced = run_cell(compose_config(cell_overrides + ["run.force=true"]))
    assert not forced.get("_reused") and forced["samples"] == rec["samples"]


def test_cell_resumes_from_partial_answers(cell_overrides):
    cfg = compose_config(cell_overrides)
    from harness.config import resolved
    from harness.results import record_key

    key = record_key(resolved(cfg))
    store = ResultsStore(cfg.store.dir)
    # answers of a killed earlier attempt: docs 0 and 1 were done (deliberately fake text, to see reuse)
    from harness.environment import code_fingerprint

    store.append_partial(key, [("vtbench_shapes", "test", 0, "resumed-0"), ("vtbench_shapes", "test", 1, "resumed-1")],
                         code_fingerprint())
    rec = run_cell(cfg)
    assert rec["n_resumed"] == 2
    preds = {s["doc_id"]: s["prediction"] for s in rec["samples"]}
    assert preds[0] == "resumed-0" and preds[1] == "resumed-1"
    assert not store.partial_path(key).exists()


def test_answers_of_other_code_are_never_resumed(cell_overrides, capsys):
    """A partial file written by other vtbench code (an edit between the kill and the resume) is discarded:
    one record never mixes answers of two code versions."""
    cfg = compose_config(cell_overrides + ["run.seed=3"])
    from harness.config import resolved
    from harness.results import record_key

    key = record_key(resolved(cfg))
    store = ResultsStore(cfg.store.dir)
    store.append_partial(key, [("vtbench_shapes", "test", 0, "stale-0")], code="0123456789abcdef")
    rec = run_cell(cfg)
    assert rec["n_resumed"] == 0 and rec["samples"][0]["prediction"] != "stale-0"
    assert "was written by other vtbench code" in capsys.readouterr().err


@pytest.mark.slow
def test_lmms_eval_cli_runs_vtbench_model(tiny_checkpoint, data_dir, tmp_path):
    env = dict(os.environ, VTBENCH_DATA=data_dir)
    bin_dir = os.path.dirname(sys.executable)
    include = subprocess.run([os.path.join(bin_dir, "vtbench-prepare")], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    out = subprocess.run(
        [os.path.join(bin_dir, "lmms-eval"), "--model", "vtbench", "--model_args", f"model.pretrained={tiny_checkpoint}",
         "--include_path", include, "--tasks", "vtbench_shapes", "--limit", "4", "--batch_size", "2",
         "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vtbench_shapes" in out.stdout and "exact_match" in out.stdout


@pytest.mark.bad_input
def test_nonfinite_logits_are_flagged_in_the_record(cell_overrides):
    """A model producing NaN logits still yields a record, with every affected sample flagged."""
    import harness.models.loading as loading

    real = loading.load_model

    def nan_model(*a, **k):
        model, processor, adapter = real(*a, **k)
        model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
        return model, processor, adapter

    orig = loading.load_model
    loading.load_model = nan_model
    try:
        rec = run_cell(compose_config(cell_overrides + ["run.seed=7"]))
    finally:
        loading.load_model = orig
    assert rec["status"] == "complete"
    assert rec["n_nonfinite"] == rec["n_samples"] == 4
    assert sorted(rec["nonfinite"]) == [f"vtbench_shapes/{i}" for i in range(4)]


def test_a_forced_cell_reuses_its_flops_counts_and_says_so(cell_overrides):
    """FLOPs are counted once per (model, method parameters, token layout): a forced re-run of a cell traces
    nothing and records the same counts; other parameters are counted afresh."""
    import harness.efficiency.flops as F
    from harness.efficiency.probe import measure_cell

    eff = ["run.efficiency.enabled=true", "run.efficiency.probe_size=2", "run.efficiency.flops_docs=2",
           "run.efficiency.repeats=1", "run.efficiency.warmup=0", "run.efficiency.decode_tokens=1",
           "method=fastv", "method.params.K=1"]
    first = run_cell(compose_config(cell_overrides + eff), efficiency_fn=measure_cell)["efficiency"]
    assert first["flops_docs"] == 2 and first["flops_layouts_reused"] == 0
    n = first["flops_layouts_counted"]
    assert n >= 1 and first["flops"]["counted_equals_analytic"]

    calls = []
    real = F.count_prefill

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "count_prefill", counting)
        again = run_cell(compose_config(cell_overrides + eff + ["run.force=true"]), efficiency_fn=measure_cell)
        assert calls == [] and again["efficiency"]["flops_layouts_reused"] == n
        assert again["efficiency"]["flops"] == first["flops"]
        other = run_cell(compose_config(cell_overrides + eff + ["method.params.R=0.75"]), efficiency_fn=measure_cell)
        assert len(calls) == n and other["efficiency"]["flops_layouts_counted"] == n
    assert other["efficiency"]["flops"]["prefill"]["total"] < first["flops"]["prefill"]["total"]
