"""The runtime guard: a record whose counted FLOPs differ from the method's analytic ones, or whose visual
tokens reaching the LLM differ from what the method reports, is marked and named — one warning line
(`vtbench: warning: ...`), a record field (`efficiency.mismatches`, checked by the schema) and a table
footnote (`harness/report.py`) — never silent."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from harness.efficiency import probe as P
from harness.schema import _efficiency_inconsistency
from methods.base import Method
from methods.stride import Stride
from tests.efficiency.helpers import inputs_for, tiny


@dataclasses.dataclass
class _StrideWithoutHooks(Stride):
    """`stride` as a new author might first write it: the patch, none of the formulas (not registered)."""

    def visual_tokens_kept(self, layout):
        return Method.visual_tokens_kept(self, layout)

    def analytic_prefill_macs(self, shapes, layout):
        return Method.analytic_prefill_macs(self, shapes, layout)

    def llm_visual_schedule(self, shapes, layout):
        return None


def _measure(method, monkeypatch, tmp_path):
    from harness.models.adapter import get_adapter

    monkeypatch.setenv("VTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_COUNTS", {})
    model, processor = tiny("llava", "llama")
    model = copy.deepcopy(model)
    method.apply(model, get_adapter(model))
    return P.measure_inputs(model, method, [inputs_for(processor)], warmup=0, repeats=1, decode_tokens=1,
                            cache=P.CountCache(None))


@pytest.mark.parametrize("cls, bad", [(Stride, False), (_StrideWithoutHooks, True)], ids=["hooks", "no-hooks"])
def test_probe_marks_and_names_a_method_whose_formulas_disagree(cls, bad, monkeypatch, tmp_path, capsys):
    eff = _measure(cls(stride=3), monkeypatch, tmp_path)
    if not bad:
        assert eff["mismatches"] == [] and eff["flops"]["counted_equals_analytic"] is True
        return
    text = " ".join(eff["mismatches"])
    assert len(eff["mismatches"]) == 2
    assert "Method.analytic_prefill_macs" in text and "Method.visual_tokens_kept" in text
    assert eff["flops"]["counted_equals_analytic"] is False
    assert eff["visual_tokens_to_llm"] != eff["visual_tokens_to_llm_analytic"]
    P.warn_mismatches("stride", eff["mismatches"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vtbench: warning: method stride: counted prefill FLOPs differ")
    assert _efficiency_inconsistency(eff) is None  # a marked record is a valid record
    silent = dict(eff, mismatches=[])
    assert "does not say so" in _efficiency_inconsistency(silent)  # an unmarked mismatch is refused
    assert "not a list" in _efficiency_inconsistency(dict(eff, mismatches="x"))


def test_report_footnotes_a_marked_record(tmp_path):
    from harness.report import build_tables, render
    from harness.results import ResultsStore
    from tests.records import make_record

    line = "counted prefill FLOPs differ from the method's analytic ones (llm 653.0 M vs 973.3 M): Method.analytic_prefill_macs"
    store = ResultsStore(tmp_path / "store")
    store.write(make_record("none", [1, 0], flops=4e9))
    rec = make_record("stride", [1, 1], params={"stride": 3}, flops=2e9)
    rec["efficiency"]["mismatches"] = [line]
    store.write(rec)
    store.write(make_record("stride", [1, 0], params={"stride": 2}, flops=3e9))
    (t,) = build_tables(str(tmp_path / "store"))[0].values()
    md = render(t, "md", "tiny")
    assert "‡ stride (" in md and line in md
    assert sum("‡" in p for p in t["params"]) == 1  # only the marked record
