"""The efficiency probe (`harness.efficiency.probe`): FLOPs counted once per (model, method parameters,
token layout) and kept across cells, FLOPs on the first `flops_docs` probe documents, one warm-up."""
from __future__ import annotations

import copy
import json

import pytest

from harness.efficiency import probe as P
from tests.efficiency.helpers import inputs_for, tiny


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_COUNTS", {})
    return tmp_path / "cache" / "flops"


def _patched(name: str, params: dict):
    import methods
    from harness.models.adapter import get_adapter

    model, processor = tiny("llava", "llama")
    model = copy.deepcopy(model)
    m = methods.build(name, params)
    adapter = get_adapter(model)
    m.validate(adapter)
    m.apply(model, adapter)
    return model, processor, m


def _inputs(processor):
    # three prompts, two token layouts (the first two are one prompt)
    return [inputs_for(processor, texts=(t,)) for t in ("What is shown?", "What is shown?", "Which colour is the big one?")]


def _measure(model, m, inputs, cache, **kw):
    return P.measure_inputs(model, m, inputs, warmup=0, repeats=1, decode_tokens=1, cache=cache, **kw)


def test_counts_are_kept_and_reused_across_calls_and_processes(cache_root):
    model, processor, m = _patched("fastv", {"K": 1, "R": 0.5})
    inputs = _inputs(processor)
    base = {"model": "tiny-test", "method": {"name": "fastv", "params": m.params()}}
    first = _measure(model, m, inputs, P.CountCache(base), flops_docs=None)
    assert (first["flops_layouts_counted"], first["flops_layouts_reused"]) == (2, 0)
    assert len(list(cache_root.glob("*.json"))) == 2

    # the same process: served from memory; a new process: from disk (the memory layer emptied)
    again = _measure(model, m, inputs, P.CountCache(base), flops_docs=None)
    P._COUNTS.clear()
    disk = _measure(model, m, inputs, P.CountCache(base), flops_docs=None)
    for rec in (again, disk):
        assert (rec["flops_layouts_counted"], rec["flops_layouts_reused"]) == (0, 2)
        assert rec["flops"] == first["flops"]
        assert rec["visual_tokens_to_llm"] == first["visual_tokens_to_llm"]
    assert first["flops"]["counted_equals_analytic"] and first["flops"]["source"] == "counted"


def test_other_parameters_or_model_count_again(cache_root):
    model, processor, m = _patched("fastv", {"K": 1, "R": 0.5})
    inputs = _inputs(processor)[:1]
    base = {"model": "tiny-test", "method": {"name": "fastv", "params": m.params()}}
    a = _measure(model, m, inputs, P.CountCache(base))
    model2, _, m2 = _patched("fastv", {"K": 1, "R": 0.75})  # drops more
    b = _measure(model2, m2, inputs, P.CountCache(dict(base, method={"name": "fastv", "params": m2.params()})))
    c = _measure(model, m, inputs, P.CountCache(dict(base, model="another checkpoint")))
    assert b["flops_layouts_counted"] == c["flops_layouts_counted"] == 1
    assert b["flops"]["prefill"]["total"] < a["flops"]["prefill"]["total"] == c["flops"]["prefill"]["total"]


def _llm_1000(e):  # a plausible hand edit: the LLM's FLOPs and a total that agrees with them
    flops = dict(e["prefill"]["flops"], llm=1000)
    return dict(e, prefill=dict(e["prefill"], flops=flops, total=sum(flops.values())))


#: edits of a stored entry (a dict without its seal)
EDITS = {
    "key": lambda e: dict(e, key="0" * 32),                                          # another entry's key
    "total": lambda e: dict(e, prefill=dict(e["prefill"], total=1)),                  # total != sum
    "negative": lambda e: dict(e, prefill=dict(e["prefill"], flops={"llm": -5})),     # negative count
    "source": lambda e: dict(e, prefill=dict(e["prefill"], source="analytic")),       # not a count
    "delivered": lambda e: dict(e, delivered="many"),
    "decode": lambda e: dict(e, decode={"phase": "decode"}),
    "llm_1000": _llm_1000,
}
#: edits only the seal can catch (the entry still agrees with itself)
SEAL_ONLY = ("llm_1000",)


def _unseal(text):
    from harness.schema import SEAL_FIELD

    return {k: v for k, v in json.loads(text).items() if k != SEAL_FIELD}


def _garbles():
    from harness.schema import SEAL_FIELD, dumps_sealed

    out = {"json": lambda t: "{not json", "truncated": lambda t: t[: len(t) // 2],
           "unsealed": lambda t: json.dumps(_unseal(t)),
           "duplicate_key": lambda t: t.replace('"delivered": ', '"delivered": 0, "delivered": ', 1)}
    for name, edit in EDITS.items():  # edited in place, the old seal kept
        out[f"{name}_old_seal"] = lambda t, edit=edit: json.dumps({**edit(_unseal(t)), SEAL_FIELD: json.loads(t)[SEAL_FIELD]})
        if name not in SEAL_ONLY:  # edited and sealed again: the field checks refuse it
            out[f"{name}_resealed"] = lambda t, edit=edit: dumps_sealed(edit(_unseal(t)))
    return out


GARBLES = _garbles()


@pytest.fixture(scope="module")
def good_count(tmp_path_factory):
    """One count of a patched tiny model, with the file it was stored in (counted once for every garble)."""
    root = tmp_path_factory.mktemp("good-count")
    mp = pytest.MonkeyPatch()
    mp.setenv("VTBENCH_CACHE", str(root))
    mp.setattr(P, "_COUNTS", {})
    try:
        model, processor, m = _patched("random", {"keep_ratio": 0.3})
        inputs = _inputs(processor)[:1]
        base = {"model": "tiny-test", "method": {"name": "random", "params": m.params()}}
        good = _measure(model, m, inputs, P.CountCache(base))
        (path,) = (root / "flops").glob("*.json")
        return model, m, inputs, base, good, path.name, path.read_text()
    finally:
        mp.undo()


@pytest.mark.parametrize("name", sorted(GARBLES))
def test_a_bad_stored_count_is_counted_again(cache_root, good_count, name, capsys):
    model, m, inputs, base, good, filename, text = good_count
    path = cache_root / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GARBLES[name](text))
    assert path.read_text() != text
    P._COUNTS.clear()
    capsys.readouterr()
    again = _measure(model, m, inputs, P.CountCache(base))
    assert (again["flops_layouts_counted"], again["flops_layouts_reused"]) == (1, 0)
    assert again["flops"] == good["flops"]
    assert path.read_text() == text  # rewritten whole, sealed
    assert "warning" not in capsys.readouterr().err  # a cache: counted again silently


def test_a_stored_count_is_sealed_and_reused(cache_root):
    from harness.schema import loads_sealed

    model, processor, m = _patched("random", {"keep_ratio": 0.3})
    inputs = _inputs(processor)[:1]
    base = {"model": "tiny-test", "method": {"name": "random", "params": m.params()}}
    _measure(model, m, inputs, P.CountCache(base))
    (path,) = cache_root.glob("*.json")
    assert loads_sealed(path.read_text())["key"] == path.stem
    P._COUNTS.clear()
    again = _measure(model, m, inputs, P.CountCache(base))
    assert (again["flops_layouts_counted"], again["flops_layouts_reused"]) == (0, 1)


def test_no_identity_keeps_nothing(cache_root):
    model, processor, m = _patched("random", {"keep_ratio": 0.3})
    rec = _measure(model, m, _inputs(processor)[:1], None)
    assert rec["flops_layouts_counted"] == 1 and not cache_root.exists()


def test_flops_docs_selects_the_counted_documents(cache_root):
    model, processor, m = _patched("fastv", {"K": 1, "R": 0.5})
    inputs = _inputs(processor)
    one = _measure(model, m, inputs, None, flops_docs=1)
    every = _measure(model, m, inputs, None, flops_docs=None)
    alone = _measure(model, m, inputs[2:], None, flops_docs=1)
    assert (one["flops_docs"], every["flops_docs"]) == (1, 3)
    assert one["flops_layouts_counted"] == 1 and every["flops_layouts_counted"] == 2
    # the mean over every document lies between the two layouts' own counts
    lo, hi = sorted([one["flops"]["prefill"]["total"], alone["flops"]["prefill"]["total"]])
    assert lo < every["flops"]["prefill"]["total"] < hi
    # latency and memory still cover every probe document
    assert one["latency"]["prefill_ms"]["n"] == every["latency"]["prefill_ms"]["n"] == 3


def test_warmup_runs_once_before_the_first_document(monkeypatch):
    seen = []
    real = P.measure

    def spy(model, inputs, **kw):
        seen.append(kw["warmup"])
        return real(model, inputs, **kw)

    monkeypatch.setattr(P, "measure", spy)
    model, processor, m = _patched("random", {"keep_ratio": 0.3})
    P.measure_inputs(model, m, _inputs(processor), warmup=2, repeats=1, decode_tokens=1)
    assert seen == [2, 0, 0]


def test_calibration_artefacts_enter_the_key_by_content(tmp_path):
    art = tmp_path / "ranking.json"
    art.write_text('{"ranking": [1, 0]}')
    a = P._file_aware({"layers": "auto", "calibration": str(art)})
    art.write_text('{"ranking": [0, 1]}')
    b = P._file_aware({"layers": "auto", "calibration": str(art)})
    assert a["layers"] == "auto" and a["calibration"] != b["calibration"]
    # at any depth (a composition's members), and only in calibration fields: a string parameter that
    # happens to name a file (a method option, a relative path in the working directory) stays as it is
    nested = {"members": [{"name": "shortv", "params": {"calibration": str(art)}},
                          {"name": "x", "params": {"probe_sampling": str(art)}}]}
    got = P._file_aware(nested)
    assert got["members"][0]["params"]["calibration"] == b["calibration"]
    assert got["members"][1]["params"]["probe_sampling"] == str(art)
