"""Report tables from records: retention, FLOPs ratio, paired comparison with `none`."""
import numpy as np

from harness.report import build_tables, paired_stats, write_outputs
from harness.results import ResultsStore
from tests.records import make_record


def _rec(key, method, scores, preds, flops, params=None, **kw):
    return make_record(method, scores, preds, params=params, flops=flops, **kw)


def test_paired_stats_agreement_and_ci():
    a = [{"doc_id": i, "prediction": "x", "exact_match": 1.0} for i in range(50)]
    b = [{"doc_id": i, "prediction": "x" if i < 40 else "y", "exact_match": 1.0 if i < 40 else 0.0} for i in range(50)]
    s = paired_stats(a, b, "exact_match")
    assert s["n_paired"] == 50 and s["agreement"] == 0.8
    assert abs(s["diff"] - 0.2) < 1e-12
    assert s["ci_low"] < 0.2 < s["ci_high"] and s["ci_low"] > 0.05
    assert paired_stats(a, b, "exact_match") == s  # seeded


def test_tables_and_outputs(tmp_path):
    store = ResultsStore(tmp_path / "store")
    store.write(_rec("k0", "none", [1, 1, 1, 0], ["a", "b", "c", "d"], 4e9))
    store.write(_rec("k1", "fastv", [1, 0, 1, 0], ["a", "x", "c", "d"], 2e9, {"R": 0.5}))
    (store.records / "junk.json").write_text("{not json")
    tables, corrupt = build_tables(str(tmp_path / "store"))
    assert len(corrupt) == 1
    (t,) = tables.values()
    assert list(t["method"]) == ["none", "fastv"]
    row = t.set_index("method").loc["fastv"]
    assert abs(row["retention"] - 2 / 3) < 1e-9 and abs(row["flops_ratio"] - 0.5) < 1e-9
    assert row["agreement"] == 0.75
    files = write_outputs(tables, str(tmp_path / "out"))
    names = sorted(p.name for p in files)
    assert "tiny_shapes.md" in names and "tiny_shapes.tex" in names and "tiny_shapes_pareto.png" in names
    md = (tmp_path / "out" / "tables" / "tiny_shapes.md").read_text()
    assert "Counting conventions" in md and "fastv" in md
    # regenerating gives byte-identical tables
    before = {p: p.read_bytes() for p in files if p.suffix in (".md", ".csv", ".tex")}
    write_outputs(tables, str(tmp_path / "out"))
    assert all(p.read_bytes() == b for p, b in before.items())


def test_committed_tables_are_regenerated_from_committed_records(tmp_path):
    """results/tables/* are exactly what `vtbench-report` makes from the records in results/store."""
    from pathlib import Path

    import pytest

    from harness.cli.report import main

    root = Path(__file__).resolve().parents[1] / "results"
    committed = sorted((root / "tables").glob("*.*")) if (root / "tables").exists() else []
    if not committed or not (root / "store" / "records").exists():
        pytest.skip("no committed results/tables + results/store yet (run `make eval`)")
    assert main(["--store", str(root / "store"), "--out", str(tmp_path), "--no-figures"]) == 0
    for f in committed:
        assert (tmp_path / "tables" / f.name).read_text() == f.read_text(), f.name
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [f.name for f in committed]


def test_latex_escape_is_pandas_latex_escaping_without_its_private_api():
    from harness.report import latex_escape

    assert latex_escape("50% of a_b & {c} #1 $x") == r"50\% of a\_b \& \{c\} \#1 \$x"
    # ~, ^ and \ become words; a following space is kept with \space (a word would swallow it)
    assert latex_escape("~ ^ \\ ~x") == r"\textasciitilde \space \textasciicircum \space \textbackslash \space \textasciitilde x"
    assert latex_escape("→ plain") == "→ plain"
    # the same text as pandas' own LaTeX escaping (the public Styler.format(escape="latex")) on random strings
    import random

    import pandas as pd

    random.seed(0)
    alphabet = "ab&%$#_{}~^\\ →"
    texts = ["x" + "".join(random.choice(alphabet) for _ in range(random.randint(0, 10))) + "x" for _ in range(300)]
    tex = pd.DataFrame({"t": texts}).style.format(escape="latex").hide(axis="index").hide(axis="columns").to_latex()
    rows = [line.removesuffix(" \\\\") for line in tex.splitlines()[1:-1]]
    assert [latex_escape(t) for t in texts] == rows


def test_integers_print_as_integers_in_titles_file_names_and_budgets(tmp_path):
    """A pandas float column made `run.limit=8` "first 8.0 samples" / `tiny_shapes_limit8.0.*`, and a 1e-9
    FLOPs budget "1e-07% FLOPs"."""
    from harness.report import _budget_label, num_label

    store = ResultsStore(tmp_path / "store")
    store.write(_rec("k0", "none", [1, 1, 1, 0], ["a", "b", "c", "d"], 4e9, limit=8))
    store.write(_rec("k1", "fastv", [1, 0, 1, 0], ["a", "x", "c", "d"], 2e9, {"R": 0.5}, limit=8))
    store.write(_rec("k2", "none", [1, 1], ["a", "b"], 4e9))  # a group without limit: a NaN in the column
    tables, _ = build_tables(str(tmp_path / "store"))
    limited = [g for g in tables if g.limit != "None"]
    assert [g.title for g in limited] == ["shapes on tiny (first 8 samples)"]
    assert limited[0].stem == "tiny_shapes_limit8"
    names = {p.name for p in write_outputs(tables, str(tmp_path / "out"), ("md",), figures=False)}
    assert "tiny_shapes_limit8.md" in names and not any("8.0" in n for n in names)
    assert _budget_label({"kind": "flops", "value": 1e-9}) == "0.0000001% FLOPs"
    assert _budget_label({"kind": "flops", "value": 0.07}) == "7% FLOPs"
    assert _budget_label({"kind": "tokens", "value": 64}) == "64 tokens"
    assert _budget_label({"kind": "tokens", "value": 0.333333}) == "33.33% tokens"
    assert [num_label(x) for x in (8.0, np.float64(3), np.int64(5), float("nan"), None, 0.5, "tiny")] == \
        ["8", "3", "5", "None", "None", "0.5", "tiny"]
