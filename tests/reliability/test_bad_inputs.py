"""The bad-input catalogue (issue 8), end to end through `vtbench`'s entry (`harness.cli.run_one`,
in-process for speed): each case ends in one clear line and a non-zero exit with nothing half-written,
or in a flagged record where the run can go on. Cases already covered elsewhere (marker `bad_input`):
unknown model/method/benchmark and malformed values (tests/test_config.py, tests/test_cli.py), hub id
while offline and missing local checkpoint (tests/test_cli.py), impossible budgets on full-size models
(tests/test_budget.py), unsupported family adapter (tests/models/test_tiny_builders.py), non-finite
logits (tests/test_runner.py), corrupt record in the store (tests/test_results.py)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from harness.cli.main import run_one
from harness.config import compose_config, resolved
from harness.results import ResultsStore, record_key

pytestmark = pytest.mark.bad_input


# ---- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture
def args(tiny_checkpoint, data_dir, tmp_path):
    return [f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={tmp_path / 'store'}",
            "logger=none", "run.limit=3", "run.efficiency.enabled=false"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before any weights load."""
    import harness.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded for a bad input")

    monkeypatch.setattr(loading, "load_model", boom)


def our_lines(err: str) -> list[str]:
    import re

    return [ln.strip() for ln in re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)) if ln.strip().startswith("vtbench:")]


def one_line_error(capsys, rc, code=2) -> str:
    err = capsys.readouterr().err
    lines = our_lines(err)
    assert rc == code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def nothing_written(store: Path) -> None:
    """No record, no partial answer, no temp file in the store."""
    if not store.exists():
        return
    files = [p for p in store.rglob("*") if p.is_file() and p.parent.name != "locks"]
    assert not files, files


def _key(overrides) -> str:
    return record_key(resolved(compose_config(overrides)))


# ---- configuration / method against the model (before any weights load) ---------------------------------
@pytest.mark.parametrize("extra, message", [
    (["method=fastv", "method.params.R=1.5"], "fastv: R must be in [0, 1)"),            # parameter out of range
    (["method=fastv", "method.params.K=4"], "must be < the number of LLM layers (4)"),   # layer past the model
    (["method=shortv", "method.params.layers=[1,9]"], "shortv"),                          # layer past the model
    (["method=fastv", "budget.kind=tokens", "budget.value=65"], "exceeds the 64 visual tokens"),  # budget > tokens
    (["method=fastv", "method.params.keep=100"], "exceeds the 64 visual tokens"),
    (["model.family=internvl"], "model.family 'internvl' is not supported"),             # unsupported family
    (["model.family=qwen2_vl"], "model.family=qwen2_vl: the model's architecture is a llava model"),  # mismatch
    (["model=nosuch"], "unknown model 'nosuch'"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["benchmark=nosuch"], "unknown benchmark 'nosuch'"),
])
def test_refused_before_loading_in_one_line(extra, message, args, tmp_path, capsys, no_model_load):
    rc = run_one(args + extra)
    line = one_line_error(capsys, rc)
    assert message in line, line
    nothing_written(tmp_path / "store")


def test_method_not_applicable_to_the_family(tiny_checkpoint, tmp_path, args, capsys, no_model_load):
    """A checkpoint of a family vtbench has no adapter for (its config.json says internvl)."""
    ckpt = tmp_path / "other-family"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "internvl"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc = run_one(args + [f"model.pretrained={ckpt}"])
    line = one_line_error(capsys, rc)
    assert "internvl" in line and "not supported" in line, line
    nothing_written(tmp_path / "store")


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_missing_local_checkpoint(args, tmp_path, capsys, no_model_load):
    rc = run_one(args + [f"model.pretrained={tmp_path / 'missing'}"])
    assert "not found" in one_line_error(capsys, rc)
    nothing_written(tmp_path / "store")


def test_hub_id_while_offline(args, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = run_one(args + ["model.pretrained=some-org/some-llava-that-is-not-cached"])
    assert "HF_HUB_OFFLINE=1" in one_line_error(capsys, rc)
    nothing_written(tmp_path / "store")


def test_truncated_safetensors(tiny_checkpoint, args, tmp_path, capsys, no_model_load):
    ckpt = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    rc = run_one(args + [f"model.pretrained={ckpt}"])
    line = one_line_error(capsys, rc)
    assert "truncated or corrupt safetensors" in line and "model.safetensors" in line, line
    nothing_written(tmp_path / "store")


def test_truncated_safetensors_fails_in_the_loader_too(tiny_checkpoint, tmp_path):
    """Past the pre-check, the loader itself turns safetensors' error into one ModelLoadError line."""
    from harness.models.loading import ModelLoadError, load_model

    ckpt = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, ckpt)
    os.truncate(ckpt / "model.safetensors", 1000)
    with pytest.raises(ModelLoadError) as e:
        load_model({"pretrained": str(ckpt), "dtype": "float32", "attn_implementation": "sdpa"})
    assert "\n" not in str(e.value)


# ---- benchmark data ---------------------------------------------------------------------------------------
@pytest.fixture
def own_data(data_dir, tmp_path):
    """A private copy of the generated shapes data, to damage."""
    from harness.benchmarks.prepare import prepare_shapes

    prepare_shapes(data_dir)
    dst = tmp_path / "data"
    shutil.copytree(data_dir, dst)
    prepare_shapes(dst)  # its task files now point at this copy
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_benchmark_file(own_data, args, tmp_path, capsys, no_model_load, damage):
    test_file = own_data / "shapes-seed0" / "test.parquet"
    if damage == "truncate":
        os.truncate(test_file, test_file.stat().st_size // 3)
    else:
        raw = bytearray(test_file.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(64)
        test_file.write_bytes(bytes(raw))
    rc = run_one(args + [f"data_dir={own_data}"])
    line = one_line_error(capsys, rc)
    assert "is corrupt" in line and "test.parquet" in line, line
    nothing_written(tmp_path / "store")


def test_unwritable_data_dir(args, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = run_one(args + [f"data_dir={blocker / 'data'}"])
    assert "cannot write the shapes data" in one_line_error(capsys, rc)
    nothing_written(tmp_path / "store")


@pytest.mark.slow
def test_missing_lmms_eval_benchmark_data_offline(args, tmp_path, capsys, monkeypatch, no_model_load):
    """A hub benchmark (POPE) that is not in the local datasets cache while offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    rc = run_one(args + ["benchmark=pope"])
    line = one_line_error(capsys, rc)
    assert "pope" in line, line
    nothing_written(tmp_path / "store")


def _break_image(own_data, damage: str) -> list[str]:
    """Replace the image of test doc 1 inside an otherwise intact data file, as a hub dataset may have it.
    Returns the overrides that serve the folder as such a dataset (a local lmms-eval task): as the
    built-in benchmark, the data would be refused earlier, for differing from the generator."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness.benchmarks.shapes import _sha256

    task_dir = own_data / "shapes-seed0"
    path = task_dir / "test.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    png = rows[1]["image"]["bytes"]
    bad = b"\x89PNG\r\n\x1a\n this is not an image" if damage == "not-an-image" else png[: len(png) // 2]
    rows[1]["image"] = {"bytes": bad, "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    meta = json.loads((task_dir / "meta.json").read_text())
    meta["sha256"]["test"] = _sha256(path)  # the file itself is consistent: only one image is broken
    (task_dir / "meta.json").write_text(json.dumps(meta))
    return ["benchmark.builtin=false", f"benchmark.include_path={task_dir}"]


def test_undecodable_image_is_refused_before_loading(own_data, args, tmp_path, capsys, no_model_load):
    """One line naming the document, before the model loads (lmms-eval would otherwise crash while
    post-processing, after all the generation work)."""
    local_task = _break_image(own_data, "not-an-image")
    rc = run_one(args + [f"data_dir={own_data}"] + local_task)
    line = one_line_error(capsys, rc)
    assert "is corrupt: document 1 cannot be read" in line, line
    nothing_written(tmp_path / "store")


def test_truncated_image_is_flagged_in_the_record(own_data, args, tmp_path, capsys):
    """lmms-eval deliberately decodes truncated images (grey-filled): the cell runs, the record says so."""
    local_task = _break_image(own_data, "truncated-png")
    assert run_one(args + [f"data_dir={own_data}"] + local_task) == 0
    assert "1 truncated image(s)" in capsys.readouterr().err
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "store" / "records").glob("*.json")]
    assert rec["status"] == "complete" and rec["truncated_images"] == ["vtbench_shapes/1"]
    assert rec["n_truncated_images"] == 1


# ---- results store ----------------------------------------------------------------------------------------
def test_unwritable_store(args, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = run_one(args + [f"store.dir={blocker / 'store'}"])
    assert "is not writable" in one_line_error(capsys, rc)


def _fail_when_writing(monkeypatch, where: str):
    """Make fsync of files under `<store>/<where>/` fail with ENOSPC (a full disk)."""
    import harness.results as results

    real = os.fsync

    def fsync(fd):
        if f"/{where}/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)


@pytest.mark.parametrize("where", ["records", "partial"])
def test_full_disk(where, args, tmp_path, capsys, monkeypatch):
    _fail_when_writing(monkeypatch, where)
    rc = run_one(args)
    line = one_line_error(capsys, rc)
    assert "No space left on device" in line, line
    store = tmp_path / "store"
    assert not list(store.rglob("*.json")) and not list(store.rglob("*.tmp"))  # no record, no temp file
    monkeypatch.undo()
    assert run_one(args) == 0  # disk freed: the same command completes


def test_corrupt_record_file_is_reported_excluded_and_recomputed(args, tmp_path, capsys):
    from harness.report import build_tables
    from harness.results import load

    assert run_one(args) == 0
    store = ResultsStore(tmp_path / "store")
    (path,) = store.records.glob("*.json")
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:200])  # torn by some other tool
    with pytest.warns(UserWarning, match="corrupt record"):
        assert load(store.root).empty  # never aggregated
    tables, corrupt = build_tables(str(store.root))
    assert tables == {} and [c[0] for c in corrupt] == [str(path)]
    from harness.cli.report import main as report_main

    capsys.readouterr()
    report_main(["--store", str(store.root), "--out", str(tmp_path / "out"), "--formats", "md"])
    assert f"skipped corrupt record {path}" in capsys.readouterr().err
    # the cell itself is evaluated again rather than trusted
    assert run_one(args) == 0
    again = json.loads(path.read_text())
    assert again["status"] == "complete" and again["samples"] == good["samples"]


# ---- run-time failures -----------------------------------------------------------------------------------
def _oom_on_call(monkeypatch, n: int):
    """The n-th generate_batch call (1-based, counted over the process) runs out of memory."""
    import torch

    from harness.lmms_model import VTBenchLMM

    real = VTBenchLMM.generate_batch
    calls = {"n": 0}

    def generate_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(VTBenchLMM, "generate_batch", generate_batch)


@pytest.mark.slow
def test_out_of_memory_in_one_cell_of_a_sweep(args, tmp_path, monkeypatch, capsys):
    """Cell 1 runs out of memory at its 3rd sample: it is recorded failed with the reason, the sweep goes
    on to cell 2, and a rerun retries cell 1 from its 2 answers."""
    from harness.results import load
    from harness.sweep import run_multirun

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    sweep = args + ["method=none,random"]
    _oom_on_call(monkeypatch, 3)
    assert run_multirun(sweep) == 1  # a sweep with a failed cell never exits 0
    err = capsys.readouterr().err
    assert "cell 1 failed: OutOfMemoryError: CUDA out of memory" in err
    last = our_lines(err)[-1]
    assert last.startswith("vtbench: 1 of 2 cells failed") and "[method=none] OutOfMemoryError" in last, last
    df = load(tmp_path / "store", include_failed=True).set_index("method")
    assert df.loc["none", "status"] == "failed" and "OutOfMemoryError" in df.loc["none", "error"]
    assert df.loc["random", "status"] == "complete"
    none_key = df.loc["none", "key"]
    assert len(ResultsStore(tmp_path / "store").load_partial(none_key)) == 2
    assert list(load(tmp_path / "store")["method"]) == ["random"]  # failed cells are not aggregated
    monkeypatch.undo()
    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    assert run_multirun(sweep) == 0
    rec = ResultsStore(tmp_path / "store").get(none_key)
    assert rec["status"] == "complete" and rec["n_resumed"] == 2 and rec["n_samples"] == 3


def test_out_of_memory_in_a_single_cell(args, tmp_path, monkeypatch, capsys):
    _oom_on_call(monkeypatch, 2)
    rc = run_one(args)
    line = one_line_error(capsys, rc, code=1)
    assert "OutOfMemoryError: CUDA out of memory" in line and "recorded as failed" in line
    rec = ResultsStore(tmp_path / "store").get(_key(args))
    assert rec["status"] == "failed" and "out of memory" in rec["error"]


# ---- W&B ---------------------------------------------------------------------------------------------------
def test_wandb_online_without_credentials_logs_offline(tmp_path, monkeypatch):
    from harness.wandb_log import effective_mode, log_cell

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.warns(UserWarning, match="without credentials; logging offline"):
        assert effective_mode("online") == "offline"
    record = {"key": "0123456789abcdef", "cell": {"model": {"name": "tiny"}, "method": {"name": "none"},
                                                  "benchmark": {"name": "shapes"}},
              "metrics": {"exact_match": 0.5}, "accuracy": 0.5, "samples": [{"doc_id": 0, "prediction": "red"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = log_cell(record, {"name": "wandb", "mode": "online", "dir": str(tmp_path / "wandb"),
                                 "project": "vtbench-test"}, {"a": 1})
    assert info is not None and info["mode"] == "offline"
    assert any("without credentials" in str(w.message) for w in caught)
    assert list((tmp_path / "wandb").rglob("offline-run-*"))
