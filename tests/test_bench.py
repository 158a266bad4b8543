"""Smoke test of `vtbench-bench --quick`: every part runs on a tiny model and the report, CSV
and JSON have the promised structure. No timing assertions (the numbers of a quick run mean nothing)."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from harness import bench
from harness.cli import bench as bench_cli


def test_helpers():
    # ShortV's paper list mapped to 16 layers: i -> i // 2, duplicates dropped, first round(19/32*16) = 10
    assert bench.shortv_layers(16) == [15, 14, 0, 13, 12, 11, 10, 1, 9, 8]
    assert bench.shortv_layers(32)[:4] == [31, 29, 30, 28] and len(bench.shortv_layers(32)) == 19
    # interleaving rotates the order every round and times every contender once per round
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert bench.machine_name("cpu") and "/" not in bench.machine_name("cpu")
    assert bench.flops_cli_params("fastv") == ["method.params.keep=192"]
    # the paired estimator: a drift that slows both sides of every round leaves the per-round ratio alone
    assert bench.paired_ratios([2.0, 4.0, 8.0], [1.0, 2.0, 4.0]) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        bench.paired_ratios([1.0, 2.0], [1.0])
    assert bench.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0] and bench.quartiles([3.0]) == [3.0, 3.0]


def test_shared_weight_copies_are_independent():
    import torch

    from harness.models import get_adapter

    spec = bench.Spec.make(True, None, 1, "cpu")
    model, _ = bench.build_model(spec)
    copy = bench.share_weights_copy(model)
    assert copy is not model and copy.lm_head is not model.lm_head
    assert copy.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    (_, fastv, info), = bench.method_settings(get_adapter(copy), ["fastv"])
    assert info["visual_tokens"] == info["visual_tokens_to_llm"] == round(64 / 3) and fastv.keep_ratio == bench.BUDGET_TOKENS
    fastv.apply(copy, get_adapter(copy))
    # patching the copy leaves the original untouched
    assert "forward" not in vars(get_adapter(model).llm_layers[2])
    with torch.no_grad():
        x = torch.randint(5, 100, (1, 8))
        torch.testing.assert_close(copy(input_ids=x).logits, model(input_ids=x).logits)


def test_method_work_times_measures_the_plan_and_restores_it():
    import torch

    from harness.models import get_adapter
    from methods._shared.llm_reduce import get_reducer

    spec = bench.Spec.make(True, None, 1, "cpu")
    model, proc = bench.build_model(spec)
    copy = bench.share_weights_copy(model)
    assert bench.method_work_times(copy, lambda: None) is None  # no LLM reducer: nothing to time
    (_, m, _), = bench.method_settings(get_adapter(copy), ["ficoco_l"])
    m.apply(copy, get_adapter(copy))
    plan = get_reducer(copy).plan
    calls = []
    orig = plan.after_attention

    def fn():
        calls.append(1)
        with torch.no_grad():
            copy(input_ids=torch.randint(5, 100, (1, 8)))  # text only: the plan runs, finds nothing to merge
    out = bench.method_work_times(copy, fn, repeats=2)
    assert len(calls) == 2 and out["total_s"] >= out["own_s"] > 0.0
    assert "after_attention" not in vars(plan) and plan.after_attention == orig


def test_timings_synchronise_the_device_at_every_clock_read(monkeypatch):
    """On CUDA kernels run asynchronously: component and own-work times read the clock only after the
    device has finished (a synchronisation before every read), and the operator profile counts kernel time.
    Checked here by recording the synchronisations the CUDA path asks for (no GPU needed)."""
    import torch

    from harness.bench import measure
    from harness.models import get_adapter

    synced = []
    monkeypatch.setattr(measure, "_sync", lambda device: synced.append(str(device)))
    spec = bench.Spec.make(True, None, 1, "cpu")
    model, _ = bench.build_model(spec)
    copy = bench.share_weights_copy(model)
    (_, m, _), = bench.method_settings(get_adapter(copy), ["ficoco_l"])
    m.apply(copy, get_adapter(copy))

    def fn():
        with torch.no_grad():
            copy(input_ids=torch.randint(5, 100, (1, 8)))
    out = measure.component_times(copy, fn, device="cuda:0")
    # 2 reads per hooked module call (vision and projector do not run on text) + 2 around the call
    assert synced and set(synced) == {"cuda:0"} and len(synced) == 2 + 2 * 2 and out["total"] >= out["llm"] > 0
    synced.clear()
    measure.component_times(copy, fn, device="cpu")
    assert set(synced) == {"cpu"}  # _sync is a no-op on CPU (it synchronises CUDA devices only)
    synced.clear()
    assert measure.method_work_times(copy, fn, repeats=1, device="cuda:0")["own_s"] > 0 and len(synced) > 2
    prof = measure.profile_prefill(fn, device="cpu")
    assert prof["time"] == "self CPU time" and abs(sum(prof["groups_ms"].values()) - prof["total_ms"]) < 1e-9


@pytest.mark.slow
def test_quick_bench_writes_report(tmp_path):
    res = bench_cli.run(["--quick", "--out", str(tmp_path), "--threads", "1", "--flops-methods", "none,fastv",
                         "--batch-methods", "fastv", "--machine", "test-machine"])
    md = (tmp_path / "test-machine.md").read_text()
    for heading in ("# vtbench performance benchmark", "## Harness overhead", "## Methods at a common budget",
                    "## Attention scores", "## Batched evaluation", "## Counting speed"):
        assert heading in md, heading
    assert "QUICK MODE" in md and "vtbench-bench --quick" in md and "loadavg_start" in md

    rows = list(csv.DictReader((tmp_path / "test-machine.csv").open()))
    assert [r["method"] for r in rows] == list(bench.METHODS)
    data = json.loads((tmp_path / "test-machine.json").read_text())
    by = {r["method"]: r for r in data["methods"]["rows"]}
    for name, r in by.items():
        assert r["counted_equals_analytic"], name
        assert r["prefill_s"] > 0 and r["generate_s"] > 0
        assert abs(r["prefill_ratio"] - r["prefill_measured"] / r["prefill_predicted"]) < 1e-9
        # measured = median over rounds of the paired t(none) / t(method); the ratio of medians is kept beside
        pairs = [a / b for a, b in zip(by["none"]["prefill_times"], r["prefill_times"])]
        assert abs(r["prefill_measured"] - statistics.median(pairs)) < 1e-12
        assert abs(r["prefill_ratio_rom"] * r["prefill_predicted"]
                   - statistics.median(by["none"]["prefill_times"]) / statistics.median(r["prefill_times"])) < 1e-9
        lo, hi = r["prefill_ratio_q"]
        assert lo <= r["prefill_ratio"] + 1e-12 and r["prefill_ratio"] <= hi + 1e-12
        if name != "none":  # every method really reduces at the common budget
            assert r["prefill_flops"] < by["none"]["prefill_flops"], name
            assert r["prefill_predicted"] > 1.0
            assert f"`{r['description']}`" in md
        assert (r["target"] is None) == (name not in bench.TARGETS)
    # a missed target comes with a profile and a gap analysis
    missed = [n for n, r in by.items() if r["target_met"] is False]
    assert set(missed) <= set(data["methods"]["profiles"])
    if missed:
        assert "Gap analysis" in md and "none" in data["methods"]["profiles"]

    ov = data["overhead"]
    assert ov["same_first_token"] and {"direct_s", "harness_s", "overhead"} <= set(ov["prefill"])
    for ph in ("prefill", "generate"):  # overhead = median over rounds of the paired ratio harness / direct
        t = ov[ph]["times"]
        pairs = sorted(h / d for d, h in zip(t["direct"], t["harness"]))
        assert pairs[0] <= ov[ph]["ratio"] <= pairs[-1]
        assert abs(ov[ph]["overhead"] - (ov[ph]["ratio"] - 1)) < 1e-12

    for name in ("fastv", "ficoco_l"):
        sc = data["scores"]["methods"][name]
        assert set(sc["variants"]) >= {"none (sdpa)", "ours (sdpa + rows)", "eager on scoring layers"}
        # the reference-style variant really materialised attention weights on the scoring layers
        assert sc["weights_kept_scoring_layers"] == len(sc["scoring_layers"]) > 0
        # ... and computes the same model as ours (eager vs SDPA: float rounding only)
        for label in ("eager on scoring layers", "eager everywhere + output_attentions"):
            assert sc["variants"][label]["max_abs_logit_diff_vs_ours"] < 1e-4, (name, label)
    assert data["scores"]["methods"]["fastv"]["scoring_layers"] == [1]

    for name in ("none", "fastv"):
        b = data["batch"]["methods"][name]
        assert b["same_predictions"], name
        assert len(set(b["prompt_lengths"])) > 1  # prompts of different lengths: left padding exercised
    fl = data["flops"]["rows"]
    assert [r["method"] for r in fl] == ["none", "fastv"] and all(r["rc"] == 0 for r in fl)
    assert fl[1]["predicted_speedup"] > 1.0
    assert fl[0]["timing"]["count"] > 0 and fl[0]["source"] == "counted"
    assert fl[1]["timing"]["count"] == 0 and fl[1]["source"] == "analytic"  # fastv is not tried on meta
    # timings are reported, never compared in a test (a busy machine reorders them)
    assert data["flops"]["import_floor_s"] > 0 and all(r["seconds"] > 0 for r in fl)
    assert "Import floor:" in md
    assert res["paths"]["md"].endswith("test-machine.md")


def test_committed_bench_reports_are_rendered_from_their_json():
    """results/bench/<machine>.md is exactly what the renderer makes of results/bench/<machine>.json."""
    root = Path(__file__).resolve().parents[1] / "results" / "bench"
    pairs = [(j, j.with_suffix(".md")) for j in sorted(root.glob("*.json"))]
    if not pairs:
        pytest.skip("no committed bench report (run `make bench`)")
    for js, md in pairs:
        assert bench.render(json.loads(js.read_text())) == md.read_text(), md.name
