"""A composition cell end to end on `shapes` (tiny random checkpoint, W&B offline): the record names the
members and their resolved parameters (the budget's keep_ratio in FastV's), carries the asked-cell recall
per sample and its mean, the report row and the W&B run name the composition by its members, and the
W&B summary holds the recall."""
from __future__ import annotations

import json

from harness.config import compose_config
from harness.report import short_params
from harness.results import record_row
from harness.runner import run_cell
from harness.wandb_log import run_name
from tests.wandb_files import parse, run_files

MEMBERS = "[{name: shortv, params: {layers: [3, 0]}}, {name: fastv, params: {K: 2, R: 0.5}}]"


def test_composition_cell_record_report_and_wandb(cell_overrides, tmp_path):
    cfg = compose_config(cell_overrides + ["method=compose", f"method.params.members={MEMBERS}", "run.batch_size=2",
                                           "budget.kind=tokens", "budget.value=0.25", "logger.mode=offline"])
    rec = run_cell(cfg)
    assert rec["status"] == "complete"
    members = rec["method_params"]["members"]
    assert [m["name"] for m in members] == ["shortv", "fastv"]
    assert members[0]["params"]["layers"] == [3, 0] and members[1]["params"]["keep_ratio"] == 0.25
    assert rec["method_description"].startswith("shortv(") and "+ fastv(" in rec["method_description"]
    # asked-object recall: per sample (colour/shape/letter questions) and LLM layer; layers 0-1 come before
    # FastV acts (K=2) and are not counted (None)
    per = [s.get("asked_recall_per_layer") for s in rec["samples"]]
    measured = [p for p in per if p is not None]
    assert measured and all(p[:2] == [None, None] and len(p) == 4 and None not in p[2:] for p in measured)
    assert rec["asked_recall"]["n"] == len(measured) and 0.0 <= rec["asked_recall"]["mean"] <= 1.0
    row = record_row(rec)
    assert row["method"] == "shortv+fastv" and row["asked_recall"] == rec["asked_recall"]["mean"]
    label = short_params(row["method"], json.loads(row["method_params"]))
    assert label.startswith("shortv: layers=[3, 0]") and "fastv: keep_ratio=0.25" in label
    assert run_name(rec).startswith("tiny-shortv+fastv-tok25%")
    (f,) = run_files(tmp_path / "wandb")
    run = parse(f)
    assert run["summary"]["asked_recall"] == rec["asked_recall"]["mean"]
    assert [m["name"] for m in run["config"]["resolved"]["method_params"]["members"]] == ["shortv", "fastv"]
