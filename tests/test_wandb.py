"""W&B as a user opens it: the offline run files of a cell and of a sweep report, parsed (not grepped)."""
from __future__ import annotations

import glob
import json
import os

from harness.config import compose_config
from harness.runner import run_cell
from tests.wandb_files import artifact_files, parse, run_files


def _table_file(run_path: str, ref: dict) -> dict:
    assert ref["_type"] == "table-file", ref
    return json.load(open(os.path.join(os.path.dirname(run_path), "files", ref["path"])))


def test_cell_run_is_typed_named_and_one_per_identity(cell_overrides, tmp_path):
    ov = cell_overrides + ["method=fastv", "budget.kind=tokens", "budget.value=0.33", "run.limit=3"]
    rec = run_cell(compose_config(ov))
    forced = run_cell(compose_config(ov + ["run.force=true"]))
    assert forced["key"] == rec["key"]
    files = run_files(tmp_path / "wandb", n=2)
    assert len(files) == 2
    runs = [parse(f) for f in files]
    # one run per cell identity: the forced re-run continues the run whose id is the record key
    assert {r["run"].run_id for r in runs} == {rec["key"]}
    run = runs[-1]
    assert run["run"].display_name == f"tiny-fastv-tok33%-shapes-{rec['key'][:8]}"
    resolved = run["config"]["resolved"]
    assert resolved["method_params"]["keep_ratio"] == rec["method_params"]["keep_ratio"] == 0.33
    assert resolved["budget"]["kind"] == "tokens" and resolved["key"] == rec["key"]
    summary = run["summary"]
    assert isinstance(summary["accuracy"], float) and summary["n_samples"] == 3
    ours = {k: v for k, v in summary.items() if not k.startswith(("_", "samples")) and k != "key"}
    assert ours and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ours.values()), ours
    (hist,) = [h for h in run["history"] if "samples" in h]
    assert hist["samples"]["_type"] == "table-file" and hist["samples"]["nrows"] == 3
    # the table with its media is the run-table artifact W&B uploads (images stored beside it)
    staged = artifact_files(files[-1], "-samples")
    assert sum(p.startswith("media/images/") for p in staged) == 3
    table = json.load(open(staged["samples.table.json"]))
    cols = table["columns"]
    assert cols[:5] == ["doc_id", "question", "image", "target", "prediction"] and "exact_match" in cols
    for row in table["data"]:
        r = dict(zip(cols, row))
        assert isinstance(r["doc_id"], int) and isinstance(r["exact_match"], float)
        assert isinstance(r["question"], str) and r["question"].strip().endswith("?")
        assert r["image"]["_type"] == "image-file" and isinstance(r["nonfinite"], bool)


def test_sweep_report_run_has_typed_tables_and_charts(cell_overrides, tmp_path):
    from harness import wandb_report
    from harness.cli import wandb_report as wandb_report_cli

    from harness.runner import efficiency_fn

    for m in ("none", "random"):
        run_cell(efficiency_fn=efficiency_fn(), cfg=compose_config(cell_overrides + [f"method={m}", "run.limit=2", "logger.group=sweepB",
                                                  "run.efficiency.enabled=true", "run.efficiency.probe_size=1",
                                                  "run.efficiency.repeats=1", "run.efficiency.warmup=0"]))
    wdir = tmp_path / "report"
    assert wandb_report_cli.main(["--store", str(tmp_path / "store"), "--group", "sweepB", "--dir", str(wdir)]) == 0
    (f,) = run_files(wdir)
    run = parse(f)
    logged = {k: v for h in run["history"] for k, v in h.items()}
    (tkey,) = [k for k in logged if k.startswith("table/")]
    table = _table_file(f, logged[tkey])
    cols = table["columns"]
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert {r["method"] for r in rows} == {"none", "random"}
    assert all(isinstance(r["accuracy"], float) and isinstance(r["gflops"], float) for r in rows), rows
    # native W&B charts (Vega panels over logged tables): accuracy vs FLOPs and vs latency, one line per method
    charts = run["config"]["_wandb"]["visualize"]
    for x in ("gflops", "prefill_ms"):
        chart = charts[f"{tkey.replace('table/', 'chart/')}/accuracy_vs_{x}"]
        assert chart["panel_type"] == "Vega2" and chart["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
        assert f"{tkey.replace('table/', 'chart/')}/accuracy_vs_{x}_table" in logged
        assert charts[f"{tkey.replace('table/', 'chart/')}/accuracy_vs_{x}_cells"]["panel_config"]["panelDefId"] \
            == "wandb/scatter/v0"
