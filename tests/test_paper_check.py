"""Reproduction checks (harness/paper_check.py, `vtbench-report --paper/--hard-subset`): printed tables as
sealed data, printed vs measured with tolerance and exit status, missing cells, the offline check against
the committed default table, the baseline's spread, the blind control and the hard subset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import paper_check
from harness.cli.report import main as report_main
from harness.results import ResultsStore
from harness.schema import SchemaError, dumps_sealed, loads_sealed
from tests.records import make_record

ROOT = Path(__file__).resolve().parent.parent


def _measured_record(row, bench: str, printed: float, table, *, shift: float = 0.0) -> dict:
    """A valid record of `row` on `bench` whose metric(s) give `printed + shift` (printed units) once scaled."""
    b = table.benchmarks[bench]
    value = (printed + shift) / b.scale
    metrics = {m: 0.0 for m in b.metric}
    metrics[b.metric[0]] = value  # summed metrics (MME P+C): all of it on the first
    rec = make_record(row.method if "+" not in row.method else "compose", scores=(1.0,), model=table.model,
                      benchmark=bench, params=row.params or ({"members": [{"name": "shortv", "params": {}},
                                                                          {"name": "fastv", "params": {}}]}
                                                                         if "+" in row.method else {}),
                      budget=row.budget)
    for s in rec["samples"]:
        s.pop("exact_match")
    rec.update(primary_metric="score", accuracy=0.5, metrics={"score": 0.5, **metrics})
    return rec


def _store_from_printed(tmp_path, recipe: str, skip: set = frozenset()) -> tuple[str, object]:
    table = paper_check.load_printed(recipe)
    store = ResultsStore(tmp_path / "store")
    for row in table.rows:
        for bench, printed in row.values.items():
            if (row.label, bench) not in skip:
                store.write(_measured_record(row, bench, printed, table))
    return str(store.root), table


def test_every_printed_table_is_valid_sealed_data_of_a_recipe():
    recipes = paper_check.printed_recipes()
    assert len(recipes) >= 10
    for r in recipes:
        t = paper_check.load_printed(r)
        assert (ROOT / "conf" / "experiment" / f"{r}.yaml").is_file()
        for row in t.rows:
            assert row.paper and row.table and row.source
            for bench, v in row.values.items():  # the printed value is on the row's printed line
                assert f"{v:g}" in row.source or f"{v:.1f}" in row.source, (r, row.label, bench, v)


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["rows"][0]["values"].update(gqa=61.0), "not declared"),
    (lambda d: d["benchmarks"].update(nosuch={"printed_as": "x", "metric": ["a"], "scale": 1, "full_scale": 100}), "nosuch"),
    (lambda d: d["benchmarks"]["mmmu_val"].update(metric=["bleu"]), "bleu"),
    (lambda d: d["rows"][0].update(method="magic"), "magic"),
    (lambda d: d.update(model="gpt9"), "gpt9"),
    (lambda d: d["benchmarks"]["mmmu_val"].update(scale=0), "scale"),
    (lambda d: d["rows"][0]["values"].update(mmmu_val=None), "values"),
    (lambda d: d.update(recipe="repro_other"), "recipe"),
])
def test_bad_printed_tables_are_refused(edit, why):
    data = loads_sealed((paper_check.PRINTED_DIR / "repro_fastv_llava15_7b.json").read_bytes())
    edit(data)
    with pytest.raises(SchemaError, match=why):
        paper_check.validate_printed(data, "repro_fastv_llava15_7b")


def test_printed_table_edited_without_its_seal_is_refused(tmp_path, monkeypatch):
    text = (paper_check.PRINTED_DIR / "repro_fastv_llava15_7b.json").read_text().replace("43.7", "45.0", 1)
    (tmp_path / "repro_fastv_llava15_7b.json").write_text(text)
    monkeypatch.setattr(paper_check, "PRINTED_DIR", tmp_path)
    with pytest.raises(SchemaError, match="edited"):
        paper_check.load_printed("repro_fastv_llava15_7b")
    # and NaN is not JSON: a table cannot hold one even when sealed by hand
    data = loads_sealed((ROOT / "conf/printed/repro_fastv_llava15_7b.json").read_bytes())
    data["rows"][0]["values"]["mmmu_val"] = float("nan")
    (tmp_path / "repro_fastv_llava15_7b.json").write_text(dumps_sealed(data))  # dumps_sealed writes null
    with pytest.raises(SchemaError, match="values"):
        paper_check.load_printed("repro_fastv_llava15_7b")


def test_paper_check_printed_equals_measured_table_and_figures(tmp_path, capsys):
    store, table = _store_from_printed(tmp_path, "repro_shortv_llava15_7b")
    out = tmp_path / "out"
    rc = report_main(["--store", store, "--out", str(out), "--paper", "repro_shortv_llava15_7b", "--no-figures"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "21 cells checked, 21 within tolerance, 0 outside" in text
    assert "| Vanilla | mme | 1510.70 | 1510.70 | +0.00 |" in text
    assert "ShortV (Yuan et al., ICCV 2025)" in text and "Missing cells" not in text
    assert (out / "paper_check" / "repro_shortv_llava15_7b.csv").is_file()
    # the figure: one per benchmark, measured against printed (a two-benchmark table keeps the test fast)
    store, table = _store_from_printed(tmp_path / "fastv", "repro_fastv_llava15_7b")
    assert report_main(["--store", store, "--out", str(out), "--paper", "repro_fastv_llava15_7b"]) == 0
    figs = sorted(p.name for p in (out / "paper_check" / "figures").glob("*.png"))
    assert figs == sorted(f"paper_repro_fastv_llava15_7b_{b}.png" for b in table.benchmarks)


def test_paper_check_names_the_cell_outside_tolerance_and_exits_1(tmp_path, capsys):
    store, table = _store_from_printed(tmp_path, "repro_ficoco_llava15_7b")
    row = next(r for r in table.rows if r.label == "FastV @ 128 tokens")
    ResultsStore(store).write(_measured_record(row, "gqa", row.values["gqa"], table, shift=-2.0))  # re-sealed
    rc = report_main(["--store", store, "--out", str(tmp_path / "o"), "--paper", "repro_ficoco_llava15_7b", "--no-figures"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "1 outside: FastV @ 128 tokens on gqa (Δ -2.00)" in cap.out
    assert "1 of 72 cells outside tolerance" in cap.err
    # a looser tolerance accepts it; the MME-like full scale is honoured (points of a 0-100 scale)
    assert report_main(["--store", store, "--out", str(tmp_path / "o"), "--paper", "repro_ficoco_llava15_7b",
                        "--no-figures", "--tolerance", "2.5"]) == 0


def test_paper_check_tolerance_is_in_points_of_the_printed_full_scale(tmp_path):
    store, table = _store_from_printed(tmp_path, "repro_shortv_llava15_7b")
    row = table.rows[0]
    ResultsStore(store).write(_measured_record(row, "mme", row.values["mme"], table, shift=15.0))  # 0.75 point of 2000
    done, _, _ = paper_check.check_paper("repro_shortv_llava15_7b", store)
    mme = done[(done["benchmark"] == "mme") & (done["row"] == row.label)].iloc[0]
    assert mme["within"] and mme["tolerance"] == pytest.approx(20.0) and mme["delta_points"] == pytest.approx(0.75)
    ResultsStore(store).write(_measured_record(row, "mme", row.values["mme"], table, shift=25.0))
    done, _, _ = paper_check.check_paper("repro_shortv_llava15_7b", store)
    assert not done[(done["benchmark"] == "mme") & (done["row"] == row.label)].iloc[0]["within"]


def test_missing_cells_are_listed(tmp_path, capsys):
    store, _ = _store_from_printed(tmp_path, "repro_fastv_llava15_7b", skip={("FastV K=3 R=75%", "mmmu_val")})
    rc = report_main(["--store", store, "--out", str(tmp_path / "o"), "--paper", "repro_fastv_llava15_7b", "--no-figures"])
    text = capsys.readouterr().out
    assert rc == 0  # everything checked is within tolerance
    assert "17 cells checked" in text
    assert "**Missing cells (1):**" in text and "- FastV K=3 R=75% on mmmu_val (printed 34.10): no record in the store" in text


def test_nothing_to_check_exits_1_with_one_line(tmp_path, capsys):
    ResultsStore(tmp_path / "s").write(make_record("none", (1.0, 0.0)))
    rc = report_main(["--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--paper", "repro_fastv_llava15_7b"])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing to check: no cell of 'repro_fastv_llava15_7b'" in err


@pytest.mark.bad_input
@pytest.mark.parametrize("args, needle", [
    (["--paper", "repro_nosuch"], "repro_nosuch"),
    (["--paper", "repro_redundancylens_llava_onevision_7b"], "no printed table"),
    (["--paper", "default", "--tolerance", "nan"], "'nan'"),
    (["--paper", "default", "--tolerance", "inf"], "'inf'"),
    (["--paper", "default", "--tolerance", "-1"], "'-1'"),
    (["--paper", "default", "--tolerance", "x"], "'x'"),
    (["--tolerance", "1"], "only with --paper"),
    (["--hard-subset", "fastv"], "fastv"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    (tmp_path / "s").mkdir()
    try:
        rc = report_main(["--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), *args])
    except SystemExit as e:  # argparse's errors (harness.cli.common.ArgumentParser)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _flip(rec: dict, n: int) -> dict:
    """`rec` with `n` wrong samples made right (accuracy + n/len), consistent and ready to be re-sealed."""
    rec = json.loads(json.dumps(rec))
    metric = rec["primary_metric"]
    flipped = 0
    for s in rec["samples"]:
        if flipped < n and s.get(metric) == 0.0:
            s[metric] = 1.0
            flipped += 1
    assert flipped == n
    acc = sum(s[metric] for s in rec["samples"]) / len(rec["samples"])
    rec["accuracy"] = acc
    rec["metrics"][metric] = acc
    return rec


def test_offline_check_against_the_committed_default_table(tmp_path, capsys):
    """The committed records reproduce the committed table (exit 0); one record of the user's store moved by
    2 points and re-sealed (harness.schema) is named, exit 1. Reads whatever cells the committed table holds."""
    store = tmp_path / "store"
    shutil.copytree(ROOT / "results" / "store", store)
    committed = paper_check.committed_tables()
    n_cells = sum(len(rows) for rows in committed.values())
    assert report_main(["--store", str(store), "--out", str(tmp_path / "o"), "--paper", "default", "--no-figures"]) == 0
    assert f"{n_cells} cells checked, {n_cells} within tolerance, 0 outside" in capsys.readouterr().out
    st = ResultsStore(store)
    victim = next(r for _, r, _ in st.iter_records() if r["cell"]["method"]["name"] == "fastv" and r["n_samples"] == 200)
    st.write(_flip(victim, 4))  # 4 of 200 samples = 2 points
    rc = report_main(["--store", str(store), "--out", str(tmp_path / "o"), "--paper", "default", "--no-figures"])
    out = capsys.readouterr().out
    assert rc == 1
    label = next(f"{r['method']} · {r['budget']} · {r['params']}" for rows in committed.values() for r in rows
                 if r["key"] == victim["key"])
    assert f"1 outside: {label} on " in out and "(Δ +2.00)" in out


def test_offline_check_lists_cells_missing_from_a_fresh_store(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = report_main(["--store", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--paper", "default", "--no-figures"])
    out = capsys.readouterr().out
    n = sum(len(rows) for rows in paper_check.committed_tables().values())
    assert rc == 1 and f"**Missing cells ({n}):**" in out


def _md_rows(text: str) -> dict[str, dict]:
    """{method: {header: cell}} of the first Markdown comparison table in `text`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head) or cells == head:
            break
        out[cells[0]] = dict(zip(head, cells))
    return out


def _control_store(tmp_path) -> str:
    st = ResultsStore(tmp_path / "s")
    st.write(make_record("none", (1, 1, 1, 0, 1, 0, 1, 1)))
    st.write(make_record("blind", (1, 0, 0, 0, 1, 0, 0, 0)))
    st.write(make_record("fastv", (1, 0, 1, 0, 0, 0, 1, 1), params={"K": 2, "R": 0.5}))
    return str(st.root)


def test_blind_rows_get_the_answered_without_image_note_and_figure(tmp_path, capsys):
    store = _control_store(tmp_path)
    assert report_main(["--store", store, "--out", str(tmp_path / "o"), "--formats", "md"]) == 0
    out = capsys.readouterr().out
    assert "| blind " in out
    assert "Answered without the image (`blind`, no visual token reaches the LLM): 0.250 = 33% of `none`" in out
    assert (tmp_path / "o" / "figures" / "shapes_answered_without_image.png").is_file()


def test_hard_subset_compares_methods_on_the_samples_blind_gets_wrong(tmp_path, capsys):
    store = _control_store(tmp_path)
    rc = report_main(["--store", store, "--out", str(tmp_path / "o"), "--formats", "md", "--no-figures",
                      "--hard-subset", "blind"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Hard subset — shapes on tiny [hard-blind]" in out
    rows = _md_rows(out)
    # blind is wrong on doc 1, 2, 3, 5, 6, 7: none gets 4 of them right, fastv 3, blind none
    assert (rows["none"]["accuracy"], rows["fastv"]["accuracy"], rows["blind"]["accuracy"]) == ("0.667", "0.500", "0.000")
    assert {r["n"] for r in rows.values()} == {"6"}
    md = next((tmp_path / "o" / "tables").glob("*hard-blind*.md")).read_text()
    assert "only the samples `blind` gets wrong" in md
    # the user's store is untouched: the full-sample tables still read 8 samples
    assert ResultsStore(store).get(make_record("none", (1, 1, 1, 0, 1, 0, 1, 1))["key"])["n_samples"] == 8
    # no control cell: one line, exit 1
    assert report_main(["--store", store, "--out", str(tmp_path / "o"), "--hard-subset", "downsample"]) == 1


def test_baseline_spread_row_and_flag(tmp_path, capsys):
    st = ResultsStore(tmp_path / "s")
    st.write(make_record("none", (1, 1, 1, 0), batch_size=1))
    st.write(make_record("none", (1, 1, 0, 0), batch_size=8))
    st.write(make_record("fastv", (1, 1, 1, 0, ), batch_size=8, params={"R": 0.5}))   # +0.25 = the spread: beyond
    st.write(make_record("random", (1, 0, 0, 0), batch_size=8, params={"keep_ratio": 0.5}))  # -0.25: beyond
    st.write(make_record("tome", (1, 0, 1, 0), batch_size=8, params={"r": 1}))  # 0: within
    assert report_main(["--store", str(st.root), "--out", str(tmp_path / "o"), "--formats", "md", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | shapes | None | batch_size=1 | 0.750 |" in out and "**spread (max − min)** | **0.250**" in out
    table = out.split("[batch_size=8]")[1]
    flags = {m: r["Δ vs none within baseline spread"] for m, r in _md_rows(table).items()}
    assert flags == {"none": "-", "tome": "≈ within", "fastv": "beyond", "random": "beyond"}
    assert "`none` moves by 0.250 across protocols" in table
    assert (tmp_path / "o" / "tables" / "baseline_spread.md").is_file()


@pytest.mark.slow
def test_wandb_report_of_a_recipe_group_carries_the_paper_check(tmp_path):
    """A sweep whose W&B group is a recipe with a printed table gets the printed-vs-measured table too."""
    import glob
    import os

    from harness import wandb_report

    recipe = "repro_fastv_llava15_7b"
    table = paper_check.load_printed(recipe)
    st = ResultsStore(tmp_path / "store")
    for row in table.rows[:3]:
        for bench, printed in row.values.items():
            st.write({**_measured_record(row, bench, printed, table), "config": {"logger": {"group": recipe}}})
    info = wandb_report.log_report(str(st.root), recipe, wandb_dir=str(tmp_path / "w"), mode="offline")
    assert f"paper_check/{recipe}" in info["tables"]
    files = glob.glob(os.path.join(info["dir"], "media", "table", "paper_check", "**", "*.json"), recursive=True)
    text = open(files[0]).read()
    assert "FastV K=2 R=90%" in text and "FastV K=3 R=90%" in text and "no record in the store" in text


def test_baseline_spread_only_across_protocol_choices(tmp_path, capsys):
    """Groups that differ by something other than the protocol (here the data split) are never pooled into
    one spread: each split gets its own."""
    st = ResultsStore(tmp_path / "s")
    st.write(make_record("none", (1, 1, 1, 0), batch_size=1))
    st.write(make_record("none", (1, 1, 0, 0), batch_size=8))
    st.write(make_record("none", (0, 0, 0, 0), batch_size=1, split="val"))  # another split: not a protocol spread
    assert report_main(["--store", str(st.root), "--out", str(tmp_path / "o"), "--formats", "md", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | shapes | None (split=test) | batch_size=8 | 0.500 |" in out
    assert "**spread (max − min)** | **0.250**" in out and "split=val) | **spread" not in out


def test_a_row_with_the_papers_own_spread_uses_it_as_tolerance(tmp_path, monkeypatch):
    data = loads_sealed((paper_check.PRINTED_DIR / "repro_fastv_llava15_7b.json").read_bytes())
    data["rows"][0]["spread"] = {"mmmu_val": 3.0}
    (tmp_path / "printed").mkdir()
    (tmp_path / "printed" / "repro_fastv_llava15_7b.json").write_text(dumps_sealed(data))
    store, table = _store_from_printed(tmp_path, "repro_fastv_llava15_7b")
    monkeypatch.setattr(paper_check, "PRINTED_DIR", tmp_path / "printed")
    table = paper_check.load_printed("repro_fastv_llava15_7b")
    row = table.rows[0]
    ResultsStore(store).write(_measured_record(row, "mmmu_val", row.values["mmmu_val"], table, shift=2.5))
    done, _, _ = paper_check.check_paper("repro_fastv_llava15_7b", store)
    cell = done[(done["row"] == row.label) & (done["benchmark"] == "mmmu_val")].iloc[0]
    assert cell["within"] and cell["tolerance"] == 3.0 and cell["tolerance_source"] == "paper's spread"


def test_offline_check_fails_when_a_committed_cell_is_missing(tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(ROOT / "results" / "store", store)
    victim = sorted((store / "records").glob("*.json"))[0]
    victim.unlink()
    rc = report_main(["--store", str(store), "--out", str(tmp_path / "o"), "--paper", "default", "--no-figures"])
    cap = capsys.readouterr()
    assert rc == 1 and "**Missing cells (1):**" in cap.out and "1 committed cells missing from the store" in cap.err


@pytest.mark.slow  # composes every cell of every recipe (~16 s in all)
@pytest.mark.parametrize("recipe", paper_check.printed_recipes())
def test_every_printed_row_is_a_cell_of_its_recipe(recipe):
    """The printed table and its recipe agree: every printed benchmark is on the recipe's benchmark axis and
    every printed row matches (harness.paper_check.row_matches) exactly one cell the recipe composes."""
    from omegaconf import OmegaConf

    from harness.config import compose_config
    from harness.results import cell_identity
    from harness.sweep import _expand

    table = paper_check.load_printed(recipe)
    raw = OmegaConf.load(ROOT / "conf" / "experiment" / f"{recipe}.yaml")
    params = {k: str(v) for k, v in raw.hydra.sweeper.params.items()}
    benches = params.pop("benchmark").split(",")
    assert set(table.benchmarks) <= set(benches)
    combos = _expand([f"{k}={v}" for k, v in params.items()]) if params else [[]]
    cells = []
    for combo in combos:
        ident = cell_identity(OmegaConf.to_container(compose_config([f"experiment={recipe}", *combo,
                                                                     f"benchmark={benches[0]}"]), resolve=True))
        cells.append({"cell": ident, "method_params": ident["method"]["params"]})
    for row in table.rows:
        assert sum(paper_check.row_matches(row, c, table.model, benches[0]) for c in cells) == 1, row.label


def test_hard_subset_of_a_control_with_several_settings_keeps_what_every_setting_gets_wrong(tmp_path, capsys):
    st = ResultsStore(tmp_path / "s")
    st.write(make_record("none", (1, 1, 1, 1, 0, 1)))
    st.write(make_record("downsample", (1, 0, 0, 1, 0, 0), params={"factor": 2}))
    st.write(make_record("downsample", (1, 1, 0, 0, 0, 0), params={"factor": 4}))  # both wrong on 2, 4, 5
    st.write(make_record("fastv", (0, 1, 0, 0, 1, 0), params={"R": 0.5}))
    st.write(make_record("none", (1, 1), benchmark="other"))  # a group without the control: left out
    info = paper_check.hard_subset_store(str(st.root), "downsample", str(tmp_path / "hard"))
    assert [v["n_hard"] for v in info.values()] == [3]
    recs = {r["cell"]["method"]["name"] + str(r["cell"]["method"]["params"]): r
            for _, r, _ in ResultsStore(tmp_path / "hard").iter_records()}
    assert sorted(s["doc_id"] for s in recs["none{}"]["samples"]) == [2, 4, 5]
    assert recs["none{}"]["accuracy"] == pytest.approx(2 / 3) and recs["fastv{'R': 0.5}"]["accuracy"] == pytest.approx(1 / 3)
    assert not any(r["cell"]["benchmark"]["name"] == "other" for r in recs.values())


def test_baseline_spread_experiment_sweeps_none_over_protocols():
    from hydra import compose, initialize_config_dir

    from harness.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=baseline_spread", "model=tiny", "benchmark=shapes"],
                      return_hydra_config=True)
    assert cfg.method.name == "none"
    params = cfg.hydra.sweeper.params
    assert set(str(params["model.attn_implementation"]).split(",")) == {"sdpa", "eager"}
    assert set(str(params["run.batch_size"]).split(",")) == {"1", "8"}
