"""Result integrity (issue 16): a stored record is reused only when nothing that changes its answers
changed, and every stored file is validated when read. Through `vtbench`'s entry (`run_one`,
in-process) and `vtbench-report` where a user meets them; kill/resume in a real subprocess."""
from __future__ import annotations

import io
import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from harness.cli.main import run_one
from harness.config import compose_config, resolved
from harness.results import ResultsStore, record_key
from tests.records import make_record


def _args(ckpt, data_dir, store, *extra):
    return [f"model.pretrained={ckpt}", f"data_dir={data_dir}", f"store.dir={store}", "logger=none", "run.limit=2",
            "run.efficiency.enabled=false", *extra]


def _run(capsys, args) -> tuple[bool, str]:
    """(reused?, stderr) of one `vtbench` cell that must succeed."""
    rc = run_one(args)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    return "reusing it" in err, err


def _quiet(cell_overrides, *extra) -> list[str]:
    """The shared cell overrides without a W&B logger."""
    return [o for o in cell_overrides if not o.startswith("logger.")] + ["logger=none", *extra]


def _records(store) -> set[str]:
    return {p.stem for p in (Path(store) / "records").glob("*.json")}


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x10]))


EDITS = {
    "config": lambda ck: _edit_json(ck / "config.json", lambda c: c["text_config"].update(rms_norm_eps=1e-3)),
    "generation_config": lambda ck: _edit_json(ck / "generation_config.json", lambda c: c.update(vtbench_edit=1)),
    "chat_template": lambda ck: (ck / "chat_template.jinja").write_text(
        (ck / "chat_template.jinja").read_text().replace("ASSISTANT:", "Assistant:")),
    "tokenizer": lambda ck: _edit_json(ck / "tokenizer_config.json", lambda c: c.update(model_max_length=777)),
    "processor": lambda ck: _edit_json(ck / "processor_config.json", lambda c: c.update(vtbench_edit=1)),
    "weights": lambda ck: _flip_middle_byte(ck / "model.safetensors"),
}


@pytest.mark.slow
def test_every_checkpoint_file_that_changes_answers_is_in_the_identity(tiny_checkpoint, data_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    store = tmp_path / "store"
    args = _args(ckpt, data_dir, store)
    assert _run(capsys, args)[0] is False
    assert _run(capsys, args)[0] is True  # untouched: reused
    seen = _records(store)
    for name, edit in EDITS.items():
        edit(ckpt)
        reused, err = _run(capsys, args)
        assert not reused, f"{name}: stale record reused"
        new = _records(store) - seen
        assert len(new) == 1, name  # a new key, freshly evaluated
        seen |= new
        assert _run(capsys, args)[0] is True, name  # and that one is reused while nothing changes
    # documentation is not part of the identity
    (ckpt / "README.md").write_text("model card")
    assert _run(capsys, args)[0] is True


def test_large_weight_file_is_hashed_in_full_once(data_dir, tmp_path, capsys, monkeypatch):
    """A > 64 MiB weight file: a byte in its middle gives a new key; an untouched file is not hashed again
    (its digest comes from the stat-keyed cache, also in a new process)."""
    from harness import fingerprint
    from harness.models.tiny import build_tiny

    ckpt = tmp_path / "big"
    model, processor = build_tiny("llava", "llama", num_layers=2, intermediate_size=49152)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").stat().st_size > 64 << 20
    store = tmp_path / "store"
    args = _args(ckpt, data_dir, store, "run.limit=1")
    assert _run(capsys, args)[0] is False
    # a second lookup as a new process would do it: no in-process memo, nothing read, only stats
    fingerprint._MEMO.clear()
    opened = []
    monkeypatch.setattr(fingerprint, "open", lambda *a, **k: opened.append(a[0]) or open(*a, **k), raising=False)
    t0 = time.perf_counter()
    digest = fingerprint.folder_digest(ckpt)
    with capsys.disabled():
        print(f"\nsecond lookup of a {(ckpt / 'model.safetensors').stat().st_size >> 20} MiB checkpoint: "
              f"{1000 * (time.perf_counter() - t0):.2f} ms")
    assert opened == []
    monkeypatch.undo()
    assert _run(capsys, args)[0] is True
    _flip_middle_byte(ckpt / "model.safetensors")
    assert fingerprint.folder_digest(ckpt)["sha256"] != digest["sha256"]
    before = _records(store)
    assert _run(capsys, args)[0] is False
    assert len(_records(store) - before) == 1


def test_hub_id_identity_is_the_resolved_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    conf = resolved(compose_config(["model=llava15_7b"]))
    from harness.results import cell_identity

    assert cell_identity(conf)["model"]["commit"] == "a" * 40
    k1 = record_key(conf)
    (refs / "main").write_text("b" * 40)  # the hub's main moved on: new weights, new key
    assert record_key(conf) != k1
    pinned = resolved(compose_config(["model=llava15_7b", "model.revision=" + "c" * 40]))
    assert cell_identity(pinned)["model"]["commit"] == "c" * 40


@pytest.mark.parametrize("overrides", [
    ["method=redundancylens", "budget.kind=tokens", "budget.value=0.5"],        # auto layers set by a budget
    ["method=redundancylens", "method.params.hollow_layers=auto"],
    ["method=shortv", "method.params.layers=auto", "method.params.N=2"],
    ["method=shortv", "method.params.layers=auto", "method.params.N=0", "budget.kind=flops", "budget.value=0.9"],
])
def test_calibration_settings_are_in_the_identity_however_auto_is_reached(overrides):
    base = record_key(resolved(compose_config(overrides)))
    for cal in ("calibration.seed=1", "calibration.n=8", "calibration.benchmark=gqa", "calibration.split=test",
                "calibration.batch_size=1"):
        assert record_key(resolved(compose_config(overrides + [cal]))) != base, cal
    # where calibration files are cached is not part of it
    assert record_key(resolved(compose_config(overrides + ["calibration.dir=/elsewhere"]))) == base


def test_calibration_artefact_given_by_path_is_hashed(tmp_path):
    art = tmp_path / "lc.json"
    art.write_text(json.dumps({"ranking": [3, 2, 1, 0]}))
    ov = ["method=shortv", "method.params.layers=auto", "method.params.N=2", f"method.params.calibration={art}"]
    k1 = record_key(resolved(compose_config(ov)))
    art.write_text(json.dumps({"ranking": [0, 1, 2, 3]}))
    assert record_key(resolved(compose_config(ov))) != k1
    # explicit layers and no budget: calibration settings do not matter
    plain = ["method=shortv", "method.params.layers=[1,2]"]
    assert record_key(resolved(compose_config(plain))) == record_key(resolved(compose_config(plain + ["calibration.seed=5"])))


def test_forcing_without_efficiency_never_replaces_a_measured_record(cell_overrides, capsys):
    measured = [o for o in _quiet(cell_overrides, "run.limit=2") if not o.startswith("run.efficiency")]
    assert run_one(measured) == 0
    store = ResultsStore(compose_config(measured).store.dir)
    (rec,) = [r for _, r, _ in store.iter_records()]
    assert rec["efficiency"]["flops"]
    assert run_one(measured + ["run.force=true", "run.efficiency.enabled=false"]) == 0
    recs = {r["key"]: r for _, r, _ in store.iter_records()}
    assert len(recs) == 2 and recs[rec["key"]]["efficiency"] == rec["efficiency"]
    # the report shows that setting once, with its FLOPs
    from harness.report import build_tables

    (t,) = build_tables(str(store.root))[0].values()
    assert len(t) == 1 and t["gflops"].notna().all()


# ---- stored files are validated when read --------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("content", [
    b'{"key": "%s", "status": "complete"}',                                      # valid JSON, wrong shape
    b'{"key": "%s", "status": "complete", "accuracy": NaN}',                     # not standard JSON
    b"[1, 2, 3]",
    b'\xff\xfe{"key": "%s"}',                                                     # undecodable
])
def test_wrong_shaped_record_is_named_and_reevaluated(cell_overrides, capsys, content):
    args = _quiet(cell_overrides, "run.limit=2")
    cfg = compose_config(args)
    key = record_key(resolved(cfg))
    store = ResultsStore(cfg.store.dir)
    store.records.mkdir(parents=True)
    path = store.record_path(key)
    path.write_bytes(content.replace(b"%s", key.encode()))
    assert run_one(args) == 0
    err = capsys.readouterr().err
    assert f"ignoring invalid record {path}" in err
    assert store.get(key)["status"] == "complete"


@pytest.mark.bad_input
def test_report_names_and_skips_invalid_records(tmp_path, capsys):
    from harness import report
    from harness.cli import report as report_cli

    store = ResultsStore(tmp_path / "store")
    good = make_record("none", (1.0, 0.0))
    store.write(good)
    bad = store.records / ("0" * 16 + ".json")
    bad.write_text(json.dumps({"key": "0" * 16, "status": "complete"}))
    moved = dict(make_record("fastv", (1.0, 1.0)))
    (store.records / ("1" * 16 + ".json")).write_text(json.dumps(dict(moved, key="1" * 16)))  # under another key
    assert report_cli.main(["--store", str(store.root), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    out, err = capsys.readouterr()
    assert str(bad) in err and "1" * 16 in err
    assert "nan" not in out and out.count("### ") == 1


@pytest.mark.bad_input
def test_bad_partial_lines_are_dropped_and_answered_again(cell_overrides, capsys):
    from harness.environment import code_fingerprint

    args = _quiet(cell_overrides, "run.limit=4", "run.seed=11")
    cfg = compose_config(args)
    key = record_key(resolved(cfg))
    store = ResultsStore(cfg.store.dir)
    store.append_partial(key, [("vtbench_shapes", "test", 0, "kept-0")], code_fingerprint())
    with open(store.partial_path(key), "ab") as f:
        f.write(b'{"task": "vtbench_shapes", "split": "test", "doc_id": 1, "answer": "\xff\xfe"}\n')   # not UTF-8
        f.write(b'{"task": "vtbench_shapes", "split": "test", "doc_id": "2", "answer": 3}\n')        # wrong types
        f.write(b'{"task": "vtbench_shapes", "split": "test", "doc_id": 3, "answer": NaN}\n')        # not JSON
    store.append_partial(key, [("vtbench_shapes", "test", 3, "kept-3")], code_fingerprint())
    assert run_one(args) == 0
    rec = store.get(key)
    preds = {s["doc_id"]: s["prediction"] for s in rec["samples"]}
    assert rec["n_resumed"] == 2 and preds[0] == "kept-0" and preds[3] == "kept-3"
    assert "dropped 3 invalid line(s)" in capsys.readouterr().err


def test_counts_after_resume_equal_an_uninterrupted_run(cell_overrides):
    """n_empty (and the non-finite flags) count answers produced before an interruption too."""
    from harness.environment import code_fingerprint
    from harness.runner import run_cell

    args = _quiet(cell_overrides, "run.limit=4", "run.seed=12")
    cfg = compose_config(args)
    key = record_key(resolved(cfg))
    store = ResultsStore(cfg.store.dir)
    store.append_partial(key, [("vtbench_shapes", "test", 0, ""), ("vtbench_shapes", "test", 1, "x", True)],
                         code_fingerprint())
    rec = run_cell(cfg)
    assert rec["n_resumed"] == 2
    assert rec["n_empty"] == sum(s["prediction"] == "" for s in rec["samples"]) >= 1
    assert "vtbench_shapes/1" in rec["nonfinite"]


@pytest.mark.slow
def test_sweep_killed_then_edited_then_resumed_never_mixes_answers(tiny_checkpoint, data_dir, tmp_path):
    """SIGKILL a sweep inside its first cell, edit the checkpoint, resume: the interrupted cell's answers are
    not reused (new identity, new partial file), and every record holds answers of the edited model only."""
    from tests.reliability.helpers import cell_args, kill_when, progress, run, start

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    store = tmp_path / "store"
    args = ["-m", "method=none,random", *cell_args(str(ckpt), data_dir, store, limit=8)]
    proc = start(args, tmp_path)
    assert kill_when(proc, lambda: progress(store)[1] >= 2, sig=signal.SIGKILL)  # 2 answers of cell 1 on disk
    (partial,) = (store / "partial").glob("*.jsonl")
    EDITS["config"](ckpt)
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in (store / "records").glob("*.json")]
    assert len(recs) == 2 and all(r["status"] == "complete" for r in recs)
    assert partial.stem not in {r["key"] for r in recs} and all(r["n_resumed"] == 0 for r in recs)
    # and a fresh store on the edited checkpoint gives the same answers
    fresh = tmp_path / "fresh"
    assert run(["-m", "method=none,random", *cell_args(str(ckpt), data_dir, fresh, limit=8)], tmp_path).returncode == 0
    want = {json.loads(p.read_text())["key"]: json.loads(p.read_text())["samples"] for p in (fresh / "records").glob("*.json")}
    assert {r["key"]: r["samples"] for r in recs} == want


# ---- built-in data, checkpoints, report paths -------------------------------------------------------------
def _alter_one_image(parquet: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    t = pq.read_table(parquet)
    images = t.column("image").to_pylist()
    im = Image.open(io.BytesIO(images[5]["bytes"])).convert("RGB")
    im.putpixel((0, 0), (1, 2, 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    images[5] = dict(images[5], bytes=buf.getvalue())
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, type=t.schema.field("image").type))
    pq.write_table(t, parquet)


@pytest.mark.bad_input
@pytest.mark.parametrize("meta", ["deleted", "rewritten"])
def test_altered_builtin_data_is_refused_whatever_happens_to_its_metadata(data_dir, tmp_path, capsys, meta):
    from harness.benchmarks import shapes
    from harness.benchmarks.prepare import prepare_shapes

    prepare_shapes(data_dir)
    own = tmp_path / "data"
    shutil.copytree(data_dir, own)
    folder = own / "shapes-seed0"
    _alter_one_image(folder / "test.parquet")
    if meta == "deleted":
        (folder / "meta.json").unlink()
    else:  # checksums rewritten to match the altered file
        _edit_json(folder / "meta.json", lambda m: m["sha256"].update(test=shapes._sha256(folder / "test.parquet")))
    store = tmp_path / "store"
    rc = run_one(["logger=none", f"data_dir={own}", f"store.dir={store}", "run.limit=2", "run.efficiency.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "is corrupt" in err and "differs from what the generator makes" in err, err[-2000:]
    assert not store.exists() or not list(store.rglob("*.json*"))


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["missing_tensor", "config_more_layers", "config_fewer_layers", "extra_tensor"])
def test_inconsistent_checkpoint_is_refused(tiny_checkpoint, data_dir, tmp_path, capsys, damage):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    if damage in ("missing_tensor", "extra_tensor"):
        tensors = load_file(weights)
        if damage == "missing_tensor":
            tensors.pop(sorted(k for k in tensors if "layers.1." in k)[0])
        else:
            tensors["model.language_model.extra.weight"] = torch.zeros(3)
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        n = json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"]
        _edit_json(ckpt / "config.json",
                   lambda c: c["text_config"].update(num_hidden_layers=n + 2 if damage == "config_more_layers" else n - 1))
    store = tmp_path / "store"
    rc = run_one(_args(ckpt, data_dir, store))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vtbench:")]
    assert rc == 2 and len(lines) == 1 and "does not match its config.json" in lines[0], err[-2000:]
    assert not list(store.rglob("*.json*"))


@pytest.mark.bad_input
def test_report_file_names_never_leave_the_output_folder(tmp_path):
    from harness.report import build_tables, write_outputs

    store = ResultsStore(tmp_path / "store")
    for model in ("../../../escape", "org/model-7b"):
        store.write(make_record("none", (1.0, 0.0), model=model, flops=2e9))
        store.write(make_record("fastv", (1.0, 1.0), model=model, flops=1e9, params={"R": 0.5}))
    out = tmp_path / "deep" / "out"
    tables, _ = build_tables(str(store.root))
    files = write_outputs(tables, str(out))
    assert files and all(out.resolve() in p.resolve().parents for p in files)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents
               and tmp_path / "store" not in p.parents]
    assert outside == []
    assert any(p.name.startswith("org-model-7b_shapes") for p in files)


def test_report_compares_only_like_for_like(tmp_path, capsys):
    """val and test cells of one model: two tables, each against its own `none`; a group without `none`
    says so and borrows nothing."""
    from harness import report
    from harness.cli import report as report_cli

    store = ResultsStore(tmp_path / "store")
    store.write(make_record("none", (1.0, 1.0, 1.0, 1.0), split="test", flops=4e9))
    store.write(make_record("fastv", (1.0, 1.0, 0.0, 0.0), split="test", flops=2e9, params={"R": 0.5}))
    store.write(make_record("none", (1.0, 0.0, 0.0, 0.0), split="val", flops=4e9))
    store.write(make_record("fastv", (1.0, 0.0, 0.0, 0.0), split="val", flops=2e9, params={"R": 0.5}))
    store.write(make_record("fastv", (1.0, 1.0, 0.0, 0.0), split="test", batch_size=8, flops=2e9, params={"R": 0.5}))
    tables, _ = report.build_tables(str(store.root))
    by = {g.variant: t.set_index("method") for g, t in tables.items()}
    assert set(by) == {"batch_size=1, split=test", "batch_size=1, split=val", "batch_size=8, split=test"}
    assert by["batch_size=1, split=test"].loc["fastv", "retention"] == 0.5
    assert by["batch_size=1, split=val"].loc["fastv", "retention"] == 1.0
    assert "retention" not in by["batch_size=8, split=test"].columns
    assert report_cli.main(["--store", str(store.root), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 3 and "has no `none` cell" in out
    names = sorted(p.name for p in (tmp_path / "out" / "tables").glob("*.md"))
    assert len(names) == 3 and len(set(names)) == 3


# ---- sealed files: an edited record or artefact is never served -----------------------------------------------
def _unsealed(text: str) -> dict:
    from harness.schema import SEAL_FIELD

    return {k: v for k, v in json.loads(text).items() if k != SEAL_FIELD}


@pytest.mark.bad_input
def test_an_edited_record_is_evaluated_again_with_one_warning(cell_overrides, capsys):
    from harness.schema import dumps_sealed

    args = _quiet(cell_overrides, "run.limit=2")
    assert run_one(args) == 0
    capsys.readouterr()
    cfg = compose_config(args)
    store = ResultsStore(cfg.store.dir)
    path = store.record_path(record_key(resolved(cfg)))
    good = store.read(path)
    edits = {
        "accuracy, old seal kept": lambda t: json.dumps({**json.loads(t), "accuracy": 0.99}),
        "accuracy, sealed again": lambda t: dumps_sealed({**_unsealed(t), "accuracy": 0.99}),
        "n_empty, sealed again": lambda t: dumps_sealed({**_unsealed(t), "n_empty": 99}),
        "unsealed (earlier vtbench)": lambda t: json.dumps(_unsealed(t)),
        "duplicate key": lambda t: t.replace('\n "accuracy": ', '\n "accuracy": 0.99, "accuracy": ', 1),
    }
    for name, edit in edits.items():
        text = path.read_text()
        assert edit(text) != text, name
        path.write_text(edit(text))
        assert run_one(args) == 0, name
        err = capsys.readouterr().err
        assert err.count(f"ignoring invalid record {path}") == 1, (name, err)
        assert "reusing it" not in err, name
        again = store.read(path)
        assert again["accuracy"] == good["accuracy"] and again["samples"] == good["samples"], name


@pytest.mark.bad_input
@pytest.mark.parametrize("how", ["ranking_contradicts_scores", "ranking_99", "ranking_short", "wrong_key",
                                 "unsealed", "truncated", "edited_old_seal"])
def test_an_invalid_artefact_given_by_path_is_bad_input(cell_overrides, tmp_path, capsys, monkeypatch, how):
    import harness.models.loading as loading
    from harness.schema import dumps_sealed
    from tests.artefacts import shortv_artefact, write_sealed

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    art = shortv_artefact([0.3, 0.1, 0.2, 0.0])
    path = write_sealed(tmp_path / "lc.json", art)
    if how == "ranking_contradicts_scores":
        write_sealed(path, dict(art, ranking=[0, 1, 2, 3]))
    elif how == "ranking_99":
        write_sealed(path, dict(art, ranking=[99, 1, 2, 0]))
    elif how == "ranking_short":
        write_sealed(path, dict(art, ranking=[3, 1]))
    elif how == "wrong_key":
        write_sealed(path, dict(art, key="0" * 64))
    elif how == "unsealed":
        path.write_text(json.dumps(art))
    elif how == "truncated":
        path.write_text(dumps_sealed(art)[:40])
    else:
        path.write_text(path.read_text().replace('"ranking": [\n  3,\n  1', '"ranking": [\n  1,\n  3', 1))
        assert json.loads(path.read_text())["ranking"] == [1, 3, 2, 0]
    args = _quiet(cell_overrides, "run.limit=2", "method=shortv", "method.params.layers=auto", "method.params.N=2",
                  f"method.params.calibration={path}")
    assert run_one(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vtbench: error: method.params.calibration="), err
    assert "invalid calibration artefact" in err[0]
    store = Path(compose_config(args).store.dir)
    assert not list(store.rglob("*.json")) and not list(store.rglob("*.jsonl"))
