"""W&B as a user opens it: the offline run files of a cell and of a sweep report, parsed (not grepped)."""
from __future__ import annotations

import glob
import json
import os

from harness.config import compose_config
from harness.runner import run_cell
from tests.wandb_files import parse, run_files


def _table_file(run_path: str, ref: dict) -> dict:
    assert ref["_type"] == "table-file", ref
    return json.load(open(os.path.join(os.path.dirname(run_path), "files", ref["path"])))


def test_cell_run_is_typed_named_and_one_per_identity(cell_overrides, tmp_path):
    import shutil

    from wandb.sdk.data_types import _dtypes

    ov = cell_overrides + ["method=fastv", "budget.kind=tokens", "budget.value=0.33", "run.limit=3"]
    rec = run_cell(compose_config(ov))
    first = run_files(tmp_path / "wandb", n=1)
    forced = run_cell(compose_config(ov + ["run.force=true"]))
    assert forced["key"] == rec["key"]
    # one offline folder per run id: the forced re-run replaces the first run's folder (it logs the whole cell)
    files = run_files(tmp_path / "wandb", n=1)
    assert len(files) == 1 and files != first, (first, files)
    folders = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
    assert [os.path.basename(f).rsplit("-", 1)[1] for f in folders] == [rec["key"]]
    # the run folder holds everything: copied elsewhere (the original deleted), it still has the typed table
    # and its images
    copy = tmp_path / "copied" / os.path.basename(os.path.dirname(files[0]))
    shutil.copytree(os.path.dirname(files[0]), copy)
    shutil.rmtree(tmp_path / "wandb")
    run = parse(str(copy / os.path.basename(files[0])))
    assert run["run"].run_id == rec["key"]
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
    assert forced["wandb"]["samples_table"] == "samples/samples.table.json"
    table = json.load(open(copy / "files" / forced["wandb"]["samples_table"]))
    cols = table["columns"]
    assert cols[:5] == ["doc_id", "question", "image", "target", "prediction"] and "exact_match" in cols
    # typed columns, read back with W&B's own type registry: no column is `any`
    types = _dtypes.TypeRegistry.type_from_dict(table["column_types"]).params["type_map"]

    def names(t):
        inner = t.params["allowed_types"] if isinstance(t, _dtypes.UnionType) else [t]
        return {x.name for x in inner}

    expect = {"doc_id": {"number"}, "question": {"string", "none"}, "image": {"image-file", "none"},
              "target": {"string"}, "prediction": {"string"}, "exact_match": {"number", "none"},
              "nonfinite": {"boolean"}, "failed": {"boolean"}}
    for col, want in expect.items():
        assert names(types[col]) - {"none"} == want - {"none"}, (col, types[col])
    assert all("any" not in names(types[c]) for c in cols), types
    for row in table["data"]:
        r = dict(zip(cols, row))
        assert isinstance(r["doc_id"], int) and isinstance(r["exact_match"], float)
        assert isinstance(r["question"], str) and r["question"].strip().endswith("?")
        assert r["image"]["_type"] == "image-file" and isinstance(r["nonfinite"], bool)
        # the image is in the copied folder, a real PNG of the size the table says
        from PIL import Image

        img = Image.open(copy / "files" / "samples" / r["image"]["path"])
        assert img.size == (r["image"]["width"], r["image"]["height"])


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
    # the table with its column types is in the run folder itself: numbers as numbers, text as text, never `any`
    from wandb.sdk.data_types import _dtypes

    (stored,) = glob.glob(os.path.join(os.path.dirname(f), "files", "table_*", "*.table.json"))
    saved = json.load(open(stored))
    assert saved["columns"] == cols and saved["data"] == table["data"]
    types = _dtypes.TypeRegistry.type_from_dict(saved["column_types"]).params["type_map"]
    for c in cols:
        inner = {x.name for x in types[c].params["allowed_types"]} - {"none"}
        values = {type(r[c]) for r in rows} - {type(None)}
        assert len(inner) == 1 and "any" not in inner, (c, types[c])
        if values:
            assert inner == {"number" if values == {float} else "string"}, (c, types[c], values)
    assert {x.name for x in types["accuracy"].params["allowed_types"]} - {"none"} == {"number"}
    assert {x.name for x in types["method"].params["allowed_types"]} - {"none"} == {"string"}
