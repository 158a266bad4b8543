"""The GPU bench (`make bench-gpu`, `vtbench-bench --gpu-full`) without a GPU: the one-line refusal on a
CPU-only machine, the full-size builds of both families (on the meta device, and as scaled-down copies of the
same configs on CPU through the same code path), every method of the GPU run on both, the time guard (fake
clock) and the whole run end to end on scaled-down models."""
from __future__ import annotations

import json

import pytest
import torch

from harness import bench
from harness.cli import bench as bench_cli

#: the full configs scaled down through Hydra overrides of their `arch` block (the path `build_full` takes)
SMALL = ["model.arch.text_config.hidden_size=64", "model.arch.text_config.intermediate_size=128",
         "model.arch.text_config.num_hidden_layers=4", "model.arch.text_config.num_attention_heads=4",
         "model.arch.text_config.num_key_value_heads=4", "model.arch.vision_config.hidden_size=32",
         "model.arch.vision_config.intermediate_size=64", "model.arch.vision_config.num_hidden_layers=4",
         "model.arch.vision_config.num_attention_heads=4", "model.arch.vision_config.image_size=56",
         "model.arch.vision_config.patch_size=14", "model.arch.image_seq_length=16"]
OVERRIDES = {"llava15_7b": SMALL,
             "llava_next_7b": SMALL + ["model.arch.image_grid_pinpoints=[[56,112],[112,56],[112,112]]"]}
CPU = bench.Spec(device="cpu", dtype="float32")


def test_gpu_full_without_cuda_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench"
    assert bench_cli.main(["--gpu-full", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out == bench.NO_GPU_LINE + "\n" and cap.err == ""
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--quick"], ["--device", "cpu"], ["--arch", "qwen2_vl_7b"],
                                  ["--methods", "fastv,nope"], ["--parts", "flops"]])
def test_gpu_full_bad_input_is_one_line(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's exit, as the console script exits
        bench_cli.main(["--gpu-full", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtbench-bench: error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,family,params,image", [("llava15_7b", "llava", 7_063_427_072, 336),
                                                       ("llava_next_7b", "llava_next", 7_063_431_168, 672)])
def test_full_size_configs_build_on_meta(name, family, params, image):
    from transformers import LlavaNextProcessor

    model, proc = bench.build_full(name, bench.Spec(device="meta", dtype="float16"))
    ps = list(model.parameters())
    assert all(p.is_meta for p in ps) and {p.dtype for p in ps} == {torch.float16}
    assert sum(p.numel() for p in ps) == params  # ~7.06B each (NeXT adds its 4096-wide image_newline)
    assert model.config.model_type == family
    assert model.config.text_config.num_hidden_layers == 32 and model.config.vision_config.image_size == 336
    assert bench.bench_image_size(model.config) == image
    assert isinstance(proc, LlavaNextProcessor) == (family == "llava_next")
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the GPU run's dtype, on CPU kernels
def test_every_gpu_method_runs_on_both_families_scaled_down(dtype):
    from harness.models import get_adapter

    spec = bench.Spec(device="cpu", dtype=dtype)
    for name, family in (("llava15_7b", "llava"), ("llava_next_7b", "llava_next")):
        model, proc = bench.build_full(name, spec, OVERRIDES[name])
        assert model.config.model_type == family and model.config.text_config.num_hidden_layers == 4
        assert model.dtype == getattr(torch, dtype)
        b = bench.Bench(spec, log=lambda m: None)
        b._base = (model, proc)
        inputs = b.encode(proc, [bench.make_question(6)], [bench.make_image(0, b.image_size)])
        n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
        # LLaVA-1.5: one 56 px crop of 4x4 patches; NeXT: the 112 px image -> base crop + 2x2 crops + newlines
        assert n_vis == (16 if family == "llava" else 16 + 64 + 8)
        done = []
        for m_name, method, _, m in b._patched(bench.ALL_METHODS):
            assert get_adapter(m).family == family
            with torch.inference_mode():
                out = m.generate(**inputs, **b.gen_kwargs(proc, 2))
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2, m_name
            done.append(m_name)
        assert done == list(bench.ALL_METHODS)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_time_guard_with_a_fake_clock():
    clock = FakeClock()
    g = bench.TimeGuard(100, clock)
    assert g.remaining() == 100
    # a loop allowed half the time left (50 s), rounds of 2 x 3 s: it stops before the round that would cross
    calls = []

    def f():
        calls.append(1)
        clock.t += 3.0
    times = bench.interleaved({"a": f, "b": f}, repeats=20, warmup=0, stop=g.rounds("loop", 20, share=0.5))
    assert len(times["a"]) == len(times["b"]) == 8  # 8 rounds = 48 s; a 9th would end at 54 s > 50 s
    assert g.events == ["loop: stopped after 8 of 20 rounds (time budget)"]
    # a loop that fits runs every planned round and records nothing
    times = bench.interleaved({"a": f}, repeats=3, warmup=0, stop=g.rounds("short", 3))
    assert len(times["a"]) == 3 and len(g.events) == 1
    # whole steps: run when their estimate fits, else skipped and recorded
    assert g.allows("step", 10) and not g.allows("big step", 1000)
    assert g.events[-1].startswith("big step: skipped (estimated 1000 s")
    # a child guard gets a share of the time left and shares the parent's events
    left = g.remaining()
    c = g.child(0.4)
    assert c.remaining() == pytest.approx(0.4 * left) and c.events is g.events
    # at least one round even when the budget is already spent
    clock.t = g.end + 5
    times = bench.interleaved({"a": f}, repeats=5, warmup=0, stop=c.rounds("late", 5))
    assert len(times["a"]) == 1 and g.events[-1] == "late: stopped after 1 of 5 rounds (time budget)"


@pytest.mark.slow
def test_gpu_run_end_to_end_on_scaled_down_models(tmp_path, monkeypatch):
    """`run_gpu_full` as `--gpu-full` runs it, on CPU in fp32 with the scaled-down configs: one report per
    architecture with the methods (memory, KV cache), scores and batch parts."""
    monkeypatch.setattr(bench.gpu.gc, "collect", lambda *a: 0)  # 0.3 s per call in a big test process
    res = bench.run_gpu_full(out=tmp_path, device="cpu", dtype="float32", repeats=2, budget_s=600,
                             names=["none", "fastv", "shortv_fastv"], batch_names=["none"], machine="t",
                             overrides=OVERRIDES, log=lambda m: None)
    assert res["failed"] == [] and res["events"] == []
    for arch in bench.GPU_ARCHS:
        md = (tmp_path / f"t-{arch}.md").read_text()
        data = json.loads((tmp_path / f"t-{arch}.json").read_text())
        assert (tmp_path / f"t-{arch}.csv").is_file()
        assert data["meta"]["model"] == arch and data["meta"]["make"] == "make bench-gpu"
        assert "Nothing was cut short" in md and "make bench-gpu" in md and "flop_counter_mode" in md
        rows = {r["method"]: r for r in data["methods"]["rows"]}
        assert list(rows) == ["none", "fastv", "shortv_fastv"]
        assert data["methods"]["rounds"] == {"prefill": [2, 2], "generate": [1, 1]}
        for name, r in rows.items():
            assert r["counted_equals_analytic"], (arch, name)
            assert r["kv_cache_bytes"] > 0 and r["prefill_peak_mem_bytes"] is not None
        assert rows["fastv"]["kv_cache_bytes"] < rows["none"]["kv_cache_bytes"]
        assert set(data["scores"]["methods"]) == {"fastv", "ficoco_l"}
        assert data["batch"]["methods"]["none"]["same_predictions"]
    nxt = json.loads((tmp_path / "t-llava_next_7b.json").read_text())
    assert nxt["methods"]["layout"]["visual"] == 88  # the anyres image, not one crop


def test_gpu_run_time_guard_cuts_and_says_so(tmp_path, monkeypatch):
    """With almost no budget: one round per loop, the optional steps skipped, the second architecture not
    built, and every report says what was cut."""
    monkeypatch.setattr(bench.gpu.gc, "collect", lambda *a: 0)

    class Ticking(FakeClock):  # every reading is 0.5 s later: the 1 s budget is spent as soon as work starts
        def __call__(self) -> float:
            self.t += 0.5
            return self.t
    res = bench.run_gpu_full(out=tmp_path, device="cpu", dtype="float32", repeats=4, budget_s=1,
                             names=["none", "fastv"], machine="t", overrides=OVERRIDES, log=lambda m: None,
                             clock=Ticking())
    first = json.loads((tmp_path / "t-llava15_7b.json").read_text())
    assert first["methods"]["rounds"] == {"prefill": [1, 4], "generate": [1, 2]}
    assert "scores" not in first and "batch" not in first
    ev = first["meta"]["time_guard"]["events"]
    assert any("methods: prefill: stopped after 1 of 4 rounds" in e for e in ev)
    assert any(e.startswith("llava15_7b: scores: skipped") for e in ev)
    assert "Cut short by the budget" in (tmp_path / "t-llava15_7b.md").read_text()
    second = json.loads((tmp_path / "t-llava_next_7b.json").read_text())
    assert "methods" not in second and second["meta"]["note"].startswith("NOT RUN: llava_next_7b")
    assert res["events"][-1].startswith("llava_next_7b (model build and FLOP counting): skipped")


def test_gpu_full_cli_hands_the_run_over_and_a_failure_exits_1(tmp_path, monkeypatch, capsys):
    """With a CUDA device (faked: the run itself is replaced), `--gpu-full` runs both architectures, every
    method and composition, the GPU parts, under the default budget; a failure is one line and exit 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return {"archs": {}, "failed": ["llava_next_7b: scores: OutOfMemoryError: CUDA out of memory"]}
    monkeypatch.setattr(bench_cli, "run_gpu_full", fake_run)
    assert bench_cli.main(["--gpu-full", "--out", str(tmp_path)]) == 1
    assert seen["device"] == "cuda" and tuple(seen["archs"]) == bench.GPU_ARCHS
    assert tuple(seen["names"]) == bench.ALL_METHODS and tuple(seen["parts"]) == bench.GPU_PARTS
    assert seen["budget_s"] == bench.GPU_BUDGET_S and seen["repeats"] is None
    err = capsys.readouterr().err.strip()
    assert err == "vtbench-bench: failed: llava_next_7b: scores: OutOfMemoryError: CUDA out of memory"


def test_gpu_run_drops_a_failing_method_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.gpu.gc, "collect", lambda *a: 0)
    patched = bench.Bench._patched

    def breaking(self, names):
        out = patched(self, names)
        for name, _, _, m in out:
            if name == "fastv":
                def boom(*a, **k):
                    raise RuntimeError("boom\nsecond line")
                m.generate = boom
        return out
    monkeypatch.setattr(bench.Bench, "_patched", breaking)
    res = bench.run_gpu_full(out=tmp_path, device="cpu", dtype="float32", repeats=2, archs=["llava15_7b"],
                             names=["none", "fastv", "random"], parts=["methods"], machine="t",
                             overrides=OVERRIDES, log=lambda m: None)
    assert res["failed"] == ["llava15_7b: fastv: RuntimeError: boom"]
    data = json.loads((tmp_path / "t-llava15_7b.json").read_text())
    assert [r["method"] for r in data["methods"]["rows"]] == ["none", "random"]
    assert "**fastv FAILED** its trial generation" in (tmp_path / "t-llava15_7b.md").read_text()
