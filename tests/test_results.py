"""Results store: record keys, atomic writes, partial (per-sample) progress, pandas loading."""
import json
import os
from pathlib import Path

import pytest

from harness.config import compose_config, resolved
from harness.results import ResultsStore, StoreError, load, record_key


def _conf(*overrides):
    return resolved(compose_config(list(overrides)))


def test_key_depends_on_what_changes_results_only():
    base = record_key(_conf())
    assert base == record_key(_conf())
    assert base == record_key(_conf("store.dir=/elsewhere", "logger=none", "run.device=cpu"))
    for ov in ["run.seed=1", "run.limit=5", "run.batch_size=2", "benchmark.split=val", "model.dtype=bfloat16",
               "model.attn_implementation=eager", "benchmark=gqa", "run.max_new_tokens=3"]:
        assert record_key(_conf(ov)) != base, ov


def _record(key, acc=0.5, status="complete"):
    return {"key": key, "status": status, "accuracy": acc, "primary_metric": "exact_match",
            "metrics": {"exact_match": acc}, "cell": {"model": {"name": "tiny"}, "method": {"name": "none", "params": {}},
                                                      "benchmark": {"name": "shapes"}},
            "efficiency": {"flops": {"prefill_total": 10}}, "samples": [{"doc_id": 0, "prediction": "x"}]}


def test_atomic_write_and_load(tmp_path):
    store = ResultsStore(tmp_path)
    store.write(_record("aaaa", 0.25))
    store.write(_record("bbbb", 0.75))
    store.write(_record("cccc", None, status="failed"))
    assert not list(store.records.glob(".*"))  # no temp files left behind
    df = load(tmp_path)
    assert sorted(df["key"]) == ["aaaa", "bbbb"]
    assert df.set_index("key").loc["bbbb", "accuracy"] == 0.75
    assert "efficiency.flops.prefill_total" in df.columns
    assert len(load(tmp_path, include_failed=True)) == 3


@pytest.mark.bad_input
def test_corrupt_record_is_reported_and_excluded(tmp_path):
    store = ResultsStore(tmp_path)
    store.write(_record("aaaa"))
    (store.records / "dead.json").write_text('{"key": "dead", "status": "compl')  # torn write by another tool
    with pytest.warns(UserWarning, match="corrupt record"):
        df = load(tmp_path)
    assert list(df["key"]) == ["aaaa"]
    assert df.attrs["corrupt"] == [str(store.records / "dead.json")]


def test_partial_progress_survives_a_torn_line(tmp_path):
    store = ResultsStore(tmp_path)
    store.append_partial("k", [("t", "test", 0, "red"), ("t", "test", 1, "blue")])
    with open(store.partial_path("k"), "a") as f:
        f.write('{"task": "t", "split": "te')  # killed mid-append
    assert store.load_partial("k") == {("t", "test", 0): "red", ("t", "test", 1): "blue"}
    store.write(_record("k"))
    assert not store.partial_path("k").exists()


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
    store.write(_record("aaaa"))
    assert json.loads((store.records / "aaaa.json").read_text())["key"] == "aaaa"


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
