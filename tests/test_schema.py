"""Sealed JSON (`harness.schema.dumps_sealed` / `loads_sealed`) and the record checks behind
`ResultsStore.read`: a hand-edited record is refused whether or not it was sealed again, for every kind of
edit, and an untouched one is served."""
from __future__ import annotations

import copy
import json

import pytest

from harness.results import ResultsStore
from harness.schema import (RECORD_SCHEMA, SEAL_FIELD, SchemaError, dumps_sealed, identity_hash, loads_sealed,
                            validate_record)
from tests.records import make_record


# ---- the seal itself ----------------------------------------------------------------------------------------
def test_seal_round_trip_and_canonical():
    obj = {"b": [1, 2.5, None, "x"], "a": {"z": True, "y": (1, 2)}, "n": float("nan")}
    text = dumps_sealed(obj, indent=1)
    back = loads_sealed(text)
    assert back == {"b": [1, 2.5, None, "x"], "a": {"z": True, "y": [1, 2]}, "n": None}
    # key order and whitespace do not matter: the seal is over the canonical JSON
    data = json.loads(text)
    assert loads_sealed(json.dumps(dict(reversed(list(data.items()))))) == back
    assert loads_sealed(dumps_sealed(back)) == back  # sealing again is stable


@pytest.mark.parametrize("text, why", [
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key"),                 # at any depth, even with equal values
    ('{"a": [{"c": 0, "c": 1}]}', "duplicate key"),
    ('{"a": NaN}', "not valid JSON"),
    ('{"a": -Infinity}', "not valid JSON"),
    ('{"a": 1e999}', "not finite"),                               # overflows to inf
    ('{"a": 1', "not valid JSON"),                                # truncated
    ("[1, 2]", "not a JSON object"),
    ('{"a": 1}', "no content_sha256 seal"),                       # unsealed (earlier vtbench code)
    ('{"a": 1, "content_sha256": 5}', "does not match"),
    ('{"a": 1, "content_sha256": "' + "0" * 64 + '"}', "does not match"),
])
def test_invalid_sealed_text_is_refused(text, why):
    with pytest.raises(SchemaError, match=why):
        loads_sealed(text)


def test_any_edit_breaks_the_seal():
    text = dumps_sealed({"x": 1, "y": [1, 2], "z": {"w": "v"}})
    for old, new in (('"x": 1', '"x": 2'), ("[1, 2]", "[2, 1]"), ('"v"', '"V"'), ('"x": 1', '"x": 1.0')):
        assert old in text
        with pytest.raises(SchemaError, match="does not match"):
            loads_sealed(text.replace(old, new, 1))


# ---- records --------------------------------------------------------------------------------------------------
EFFICIENCY = {
    "probe_size": 4, "flops_docs": 1, "flops_layouts_counted": 1, "flops_layouts_reused": 0,
    "visual_tokens_in": 144.0, "visual_tokens_llm": 144.0, "visual_tokens_per_layer": [144.0, 18.0],
    "visual_tokens_mean_per_layer": 81.0, "visual_tokens_to_llm": 18.0, "visual_tokens_to_llm_analytic": 18.0,
    "flops": {
        "prefill": {"llm": 200.0, "lm_head": 10.0, "projector": 30.0, "total": 540.0, "vision": 300.0},
        "decode_per_token": {"llm": 4.0, "lm_head": 1.0, "projector": 0.0, "total": 5.0, "vision": 0.0},
        "analytic_prefill": {"llm": 200.0, "lm_head": 10.0, "projector": 30.0, "total": 540.0, "vision": 300.0},
        "analytic_decode_per_token": {"llm": 4.0, "lm_head": 1.0, "projector": 0.0, "total": 5.0, "vision": 0.0},
        "counted_equals_analytic": True, "source": "counted", "decode_source": "counted", "counter": "fvcore",
        "unsupported_ops": {}, "convention": "FLOPs = 2 x MACs",
    },
    "latency": {
        "prefill_ms": {"median": 22.0, "min": 17.0, "q1": 21.0, "q3": 22.5, "max": 24.0, "iqr": 1.5, "n": 12},
        "decode_ms_per_token": {"median": 7.0, "min": 5.0, "q1": 6.8, "q3": 7.1, "max": 8.0, "iqr": 0.3, "n": 96},
        "clock": "perf_counter", "warmup": 1, "repeats": 3, "decode_tokens": 8,
    },
    "memory": {"peak_delta_bytes": 4096.0, "kind": "cpu_rss_sampled"},
    "kv_cache_bytes": 544768.0,
}


def good_record() -> dict:
    """A complete record shaped as the runner writes it: 4 samples, limit 4, efficiency measured."""
    rec = make_record("fastv", (1.0, 0.0, 1.0, 1.0), ["a", "b", "c", "d"], params={"R": 0.5}, limit=4,
                      config={"run": {"limit": 4}}, n_nonfinite=0, nonfinite=[], failures={})
    rec["efficiency"] = copy.deepcopy(EFFICIENCY)
    return rec


def _set(path: str, value):
    def edit(r):
        *head, last = path.split(".")
        d = r
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return edit


def _scale_prefill(f):
    def edit(r):
        r["efficiency"]["flops"]["prefill"] = {k: v * f for k, v in r["efficiency"]["flops"]["prefill"].items()}
    return edit


def _dup_sample(r):
    r["samples"].append(dict(r["samples"][0]))
    r["n_samples"] += 1


def _drop_sample(r):
    r["samples"].pop()
    r["n_samples"] -= 1


def _smaller_limit(r):  # re-keyed, so only the n_samples <= limit check can refuse it
    r["cell"]["limit"] = r["config"]["run"]["limit"] = 2
    r["key"] = identity_hash(r["cell"])


#: edits that leave a record inconsistent with itself: refused even when sealed again
INCONSISTENT = {
    "accuracy_0.99": _set("accuracy", 0.99),
    "accuracy_1.5": _set("accuracy", 1.5),
    "accuracy_null": _set("accuracy", None),
    "accuracy_and_metric": lambda r: (_set("accuracy", 0.99)(r), _set("metrics.exact_match", 0.99)(r)),
    "metric_only": _set("metrics.exact_match", 0.5),
    "flip_sample_metric": _set("samples.1.exact_match", 1.0),
    "sample_metric_missing": lambda r: r["samples"][2].pop("exact_match"),
    "sample_metric_string": _set("samples.2.exact_match", "1"),
    "duplicate_sample": _dup_sample,
    "duplicate_doc_id": _set("samples.1.doc_id", 0),
    "negative_doc_id": _set("samples.0.doc_id", -3),
    "string_doc_id": _set("samples.0.doc_id", "0"),
    "drop_sample_n_adjusted": _drop_sample,
    "drop_sample": lambda r: r["samples"].pop(),
    "n_samples": _set("n_samples", 5),
    "n_samples_over_limit": _smaller_limit,
    "n_empty_99": _set("n_empty", 99),
    "n_empty_negative": _set("n_empty", -1),
    "n_failed_99": _set("n_failed", 99),
    "n_failed_unlisted": _set("n_failed", 1),
    "n_nonfinite_99": _set("n_nonfinite", 99),
    "n_nonfinite_unlisted": _set("n_nonfinite", 1),
    "n_empty_float": _set("n_empty", 0.0),
    "schema_99": _set("schema", 99),
    "schema_missing": lambda r: r.pop("schema"),
    "primary_metric_bogus": _set("primary_metric", "bogus"),
    "run_limit": _set("config.run.limit", 8),
    "run_limit_null": _set("config.run.limit", None),
    "key": _set("key", "0" * 16),
    "cell_edited": _set("cell.seed", 7),
    "status_failed": _set("status", "failed"),
    "prefill_total_negative": _set("efficiency.flops.prefill.total", -1),
    "prefill_llm_1000": _set("efficiency.flops.prefill.llm", 1000.0),
    "prefill_llm_1000_total_consistent": lambda r: (_set("efficiency.flops.prefill.llm", 1000.0)(r),
                                                     _set("efficiency.flops.prefill.total", 1340.0)(r)),
    "flops_x0.1": _scale_prefill(0.1),
    "decode_total": _set("efficiency.flops.decode_per_token.total", 50.0),
    "flops_total_only": _set("efficiency.flops.prefill", {"total": 540.0}),
    "flops_component_string": _set("efficiency.flops.prefill.llm", "200"),
    "latency_negative": lambda r: [_set(f"efficiency.latency.prefill_ms.{k}", -1.0)(r) for k in ("min", "median")],
    "latency_median_above_max": _set("efficiency.latency.prefill_ms.median", 99.0),
    "latency_q1_below_min": _set("efficiency.latency.decode_ms_per_token.q1", 1.0),
    "visual_tokens_to_llm_-7": _set("efficiency.visual_tokens_to_llm", -7),
    "visual_tokens_per_layer": _set("efficiency.visual_tokens_per_layer.1", -18.0),
    "kv_cache_bytes": _set("efficiency.kv_cache_bytes", -1.0),
    "probe_size": _set("efficiency.probe_size", -4),
    "efficiency_not_object": _set("efficiency", [1]),
}

#: edits only the seal can catch (the record still agrees with itself)
SEAL_ONLY = {
    "prediction": _set("samples.1.prediction", "other"),
    "target": _set("samples.1.target", "other"),
    "created": _set("created", "2030-01-01T00:00:00+00:00"),
    "flops_all_x0.1": lambda r: [_scale_prefill(0.1)(r), r["efficiency"]["flops"].update(
        analytic_prefill={k: v * 0.1 for k, v in r["efficiency"]["flops"]["analytic_prefill"].items()})],
    "latency_all_halved": lambda r: r["efficiency"]["latency"].update(
        prefill_ms={k: v / 2 if k != "n" else v for k, v in r["efficiency"]["latency"]["prefill_ms"].items()}),
}


def _edited(edit) -> dict:
    rec = good_record()
    edit(rec)
    return rec


def _write_raw(store: ResultsStore, rec: dict, text: str):
    path = store.record_path(rec["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_untouched_record_is_served(tmp_path):
    store = ResultsStore(tmp_path)
    rec = good_record()
    path = store.write(rec)
    assert store.read(path) == {**rec, "schema": RECORD_SCHEMA}
    assert store.get(rec["key"])["accuracy"] == 0.75
    assert json.loads(path.read_text())[SEAL_FIELD]
    for edit in SEAL_ONLY.values():  # the semantic checks accept every seal-only edit (sealed again)
        validate_record(_edited(edit))


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_an_inconsistent_record_is_refused_even_when_sealed_again(name):
    rec = _edited(INCONSISTENT[name])
    with pytest.raises(SchemaError):
        validate_record(json.loads(json.dumps(rec)))


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_an_inconsistent_sealed_record_file_is_not_served(tmp_path, name, capsys):
    store = ResultsStore(tmp_path)
    rec = _edited(INCONSISTENT[name])
    path = _write_raw(store, rec, dumps_sealed(rec, indent=1))
    with pytest.raises(SchemaError):
        store.read(path)
    assert store.get(path.stem) is None
    assert store.get(path.stem) is None
    err = capsys.readouterr().err
    assert err.count("ignoring invalid record") == 1 and str(path) in err  # one line, however often it is asked


@pytest.mark.parametrize("name", sorted({**INCONSISTENT, **SEAL_ONLY}))
def test_a_hand_edited_record_file_is_not_served(tmp_path, name):
    """Edited in place, its old seal kept: refused by the seal, whatever the edit."""
    store = ResultsStore(tmp_path)
    rec = good_record()
    path = store.write(rec)
    data = json.loads(path.read_text())
    seal = data.pop(SEAL_FIELD)
    {**INCONSISTENT, **SEAL_ONLY}[name](data)
    target = store.record_path(data["key"]) if isinstance(data.get("key"), str) and len(data["key"]) == 16 else path
    target.write_text(json.dumps({**data, SEAL_FIELD: seal}, indent=1))
    with pytest.raises(SchemaError, match="does not match|key"):
        store.read(target)


@pytest.mark.parametrize("mangle", [
    lambda t: t.replace('"accuracy": 0.75', '"accuracy": 0.75, "accuracy": 0.1', 1),
    lambda t: t.replace('"accuracy": 0.75', '"accuracy": 0.1, "accuracy": 0.75', 1),
    lambda t: t.replace('"prediction": "a"', '"prediction": "a", "prediction": "z"', 1),
    lambda t: t.replace('"accuracy": 0.75', '"accuracy": NaN', 1),
    lambda t: t.replace('"kv_cache_bytes": 544768.0', '"kv_cache_bytes": Infinity', 1),
    lambda t: t[: len(t) // 2],
    lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != SEAL_FIELD}),   # unsealed (earlier code)
    lambda t: json.dumps({**json.loads(t), SEAL_FIELD: "0" * 64}),                       # wrong seal
    lambda t: json.dumps({**json.loads(t), SEAL_FIELD: None}),
    lambda t: "",
], ids=["dup_key_last_wins", "dup_key_first", "dup_key_nested", "nan", "infinity", "truncated", "unsealed",
        "wrong_seal", "null_seal", "empty"])
def test_malformed_record_text_is_not_served(tmp_path, mangle):
    store = ResultsStore(tmp_path)
    rec = good_record()
    path = store.write(rec)
    text = path.read_text()
    new = mangle(text)
    assert new != text
    path.write_text(new)
    with pytest.raises(SchemaError):
        store.read(path)
    ((p, r, err),) = list(store.iter_records())
    assert r is None and err


def test_a_failed_record_is_sealed_and_checked(tmp_path):
    store = ResultsStore(tmp_path)
    rec = make_record("tome", status="failed", config={"run": {"limit": None}})
    path = store.write(rec)
    assert store.read(path)["status"] == "failed"
    for edit in (_set("schema", 1), _set("config.run.limit", 3)):
        bad = copy.deepcopy(rec)
        edit(bad)
        with pytest.raises(SchemaError):
            validate_record(json.loads(dumps_sealed(bad)))


def test_the_report_skips_an_invalid_record_in_one_line(tmp_path, capsys):
    from harness.cli import report as report_cli

    store = ResultsStore(tmp_path / "store")
    store.write(make_record("none", (1.0, 0.0, 1.0, 1.0), ["a", "b", "c", "d"], limit=4))
    rec = good_record()
    path = store.write(rec)
    data = json.loads(path.read_text())
    data["accuracy"] = 0.99
    path.write_text(json.dumps(data))
    assert report_cli.main(["--store", str(store.root), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if str(path) in line] != []
    assert len([line for line in err.splitlines() if str(path) in line]) == 1
    assert "0.99" not in out and "fastv" not in out
