"""Results store: record keys, atomic writes, partial (per-sample) progress, pandas loading."""
import json
import os
from pathlib import Path

import pytest

from harness.config import compose_config, resolved
from harness.results import ResultsStore, StoreError, load, record_key
from tests.records import make_record


def _conf(*overrides):
    return resolved(compose_config(list(overrides)))


def test_key_depends_on_what_changes_results_only():
    base = record_key(_conf())
    assert base == record_key(_conf())
    assert base == record_key(_conf("store.dir=/elsewhere", "logger=none", "run.device=cpu"))
    for ov in ["run.seed=1", "run.limit=5", "run.batch_size=2", "benchmark.split=val", "model.dtype=bfloat16",
               "model.attn_implementation=eager", "benchmark=gqa", "run.max_new_tokens=3"]:
        assert record_key(_conf(ov)) != base, ov


def _record(acc=0.5, status="complete", **kw):
    return make_record(scores=(acc,) if acc is not None else (0.0,), flops=10, status=status, **kw)


def test_atomic_write_and_load(tmp_path):
    store = ResultsStore(tmp_path)
    a, b, c = _record(0.25, seed=1), _record(0.75, seed=2), _record(None, status="failed", seed=3)
    for r in (a, b, c):
        store.write(r)
    assert not list(store.records.glob(".*"))  # no temp files left behind
    df = load(tmp_path)
    assert sorted(df["key"]) == sorted([a["key"], b["key"]])
    assert df.set_index("key").loc[b["key"], "accuracy"] == 0.75
    assert "efficiency.flops.prefill.total" in df.columns
    assert len(load(tmp_path, include_failed=True)) == 3


@pytest.mark.bad_input
def test_corrupt_record_is_reported_and_excluded(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record()
    store.write(rec)
    (store.records / "dead.json").write_text('{"key": "dead", "status": "compl')  # torn write by another tool
    with pytest.warns(UserWarning, match="corrupt record"):
        df = load(tmp_path)
    assert list(df["key"]) == [rec["key"]]
    assert df.attrs["corrupt"] == [str(store.records / "dead.json")]


def test_partial_progress_survives_a_torn_line(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record()
    k = rec["key"]
    store.append_partial(k, [("t", "test", 0, "red"), ("t", "test", 1, "blue")], code="c1")
    with open(store.partial_path(k), "a") as f:
        f.write('{"task": "t", "split": "te')  # killed mid-append
    assert {i: r.answer for i, r in store.load_partial(k, "c1").items()} == {("t", "test", 0): "red", ("t", "test", 1): "blue"}
    store.write(rec)
    assert not store.partial_path(k).exists()


@pytest.mark.bad_input
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_store_fails_in_one_line(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            ResultsStore(tmp_path / "store").check_writable()
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.bad_input
def test_store_path_that_is_a_file_fails_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        ResultsStore(blocker).check_writable()


def test_records_are_plain_json(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record()
    store.write(rec)
    assert json.loads((store.records / f"{rec['key']}.json").read_text())["key"] == rec["key"]


def test_record_key_changes_with_local_weights(tmp_path):
    """Retraining a local checkpoint (same path) gives new record keys: old records are not reused."""
    import shutil

    from omegaconf import OmegaConf

    from harness.config import compose_config
    from harness.results import record_key

    src = Path(__file__).resolve().parents[1] / "harness" / "assets" / "tiny-llava"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    cfg = OmegaConf.to_container(compose_config([f"model.pretrained={ckpt}"]), resolve=True)
    k1 = record_key(cfg)
    assert record_key(cfg) == k1
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one weight bit
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert record_key(cfg) != k1


@pytest.mark.parametrize("a, b", [("64", "64.0"), ("1", "1.0"), ("0.5", "0.50")])
def test_one_budget_value_is_one_cell_however_it_is_written(a, b):
    from harness.config import compose_config, resolved
    from harness.results import record_key

    def key(v):
        return record_key(resolved(compose_config(["model=tiny", "method=fastv", "budget.kind=tokens",
                                                   f"budget.value={v}"])))
    assert key(a) == key(b)
    assert key("0.33") != key("0.22") and key("64") != key("65")
