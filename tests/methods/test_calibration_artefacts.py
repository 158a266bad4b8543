"""Calibration artefacts are sealed and checked when read (`methods._shared.calibration.read_artefact`):
every kind of corruption (truncated, unsealed, hand-edited, sealed again but inconsistent) is one class with
one behaviour -- a cached artefact is named in one warning line and computed again; an artefact given by
path is bad input (a MethodError naming the parameter, raised at validation, before any weights load)."""
from __future__ import annotations

import copy
import json

import pytest

import methods
from harness.schema import SEAL_FIELD, dumps_sealed
from methods._shared.calibration import (ArtefactError, artefact_key, artefact_path, check_artefact,
                                         load_or_compute, read_artefact)
from methods.base import MethodError
from tests.artefacts import redundancylens_artefact, shortv_artefact, write_sealed

SCORES = [0.3, 0.1, 0.2, 0.0]   # ranking [3, 1, 2, 0]
L = 4


def _shortv():
    return shortv_artefact(SCORES)


def _rl():
    return redundancylens_artefact([3, 1, 0, 2], kind="ffn", tail=1)   # rounds: 1, 0, 2


def _rekey(a):
    a["key"] = artefact_key(a["key_parts"])


def _set(k, v, rekey=False):
    def edit(a):
        a[k] = v
        if rekey:
            _rekey(a)
    return edit


def _parts(k, v):
    def edit(a):
        a["key_parts"][k] = v
        _rekey(a)
    return edit


#: (artefact factory, edit): each leaves the artefact inconsistent; every one is sealed again
SHORTV_BAD = {
    "ranking_identity": _set("ranking", [0, 1, 2, 3]),          # a permutation, but not what the scores give
    "ranking_reversed": _set("ranking", [0, 2, 1, 3]),
    "ranking_99": _set("ranking", [99, 1, 2, 0]),
    "ranking_repeated": _set("ranking", [3, 3, 2, 0]),
    "ranking_short": _set("ranking", [3, 1]),
    "ranking_long": _set("ranking", [3, 1, 2, 0, 4]),
    "ranking_string": _set("ranking", "abc"),
    "ranking_strings": _set("ranking", ["3", "1", "2", "0"]),
    "ranking_floats": _set("ranking", [3.0, 1.0, 2.0, 0.0]),
    "ranking_bools": _set("ranking", [True, False, 2, 3]),
    "ranking_negative": _set("ranking", [-1, 1, 2, 0]),
    "scores_null": _set("scores", [None, 0.1, 0.2, 0.0]),
    "scores_short": _set("scores", [0.3, 0.1, 0.2]),
    "scores_edited": _set("scores", [0.0, 0.1, 0.2, 0.3]),
    "scores_string": _set("scores", "0.1"),
    "scores_bool": _set("scores", [True, 0.1, 0.2, 0.0]),
    "key_wrong": _set("key", "0" * 64),
    "key_parts_edited": lambda a: a["key_parts"].update(seed=5),
    "key_parts_not_dict": _set("key_parts", [1]),
    "method_other": _parts("method", "redundancylens"),
    "no_ranking": lambda a: a.pop("ranking"),
    "no_scores": lambda a: a.pop("scores"),
    "no_key": lambda a: a.pop("key"),
}
TIES = [0.1, 0.1, 0.2, 0.0]  # ranking [3, 0, 1, 2]: ties go to the lower layer
RL_BAD = {
    "rounds_not_ranking": _set("scores", [{"layer": 0, "objective": 0.9}, {"layer": 1, "objective": 0.8},
                                          {"layer": 2, "objective": 0.7}]),
    "rounds_objective_null": lambda a: a["scores"][0].update(objective=None),
    "rounds_objective_string": lambda a: a["scores"][0].update(objective="1"),
    "rounds_layer_missing": lambda a: a["scores"][0].pop("layer"),
    "rounds_too_many": lambda a: a["scores"].append({"layer": 3, "objective": 0.1}),
    "tail_not_last_layers": _set("ranking", [1, 3, 0, 2]),
    "tail_out_of_range": _parts("tail", 9),
    "ranking_short": _set("ranking", [3, 1]),
    "ranking_99": _set("ranking", [99, 1, 0, 2]),
    "base_missing": lambda a: a.pop("base"),
    "base_null": _set("base", {"agreement": None}),
    "base_empty": _set("base", {}),
    "key_wrong": _set("key", "f" * 64),
}


def _bad(factory, edit):
    a = factory()
    edit(a)
    return a


def test_the_untouched_artefacts_are_accepted(tmp_path):
    for a in (_shortv(), _rl(), shortv_artefact(TIES)):
        path = write_sealed(tmp_path / "a.json", a)
        assert read_artefact(path, key_parts=a["key_parts"], num_layers=L)["ranking"] == a["ranking"]
    assert shortv_artefact(TIES)["ranking"] == [3, 0, 1, 2]


@pytest.mark.parametrize("name", sorted(SHORTV_BAD))
def test_an_inconsistent_shortv_artefact_is_refused_even_when_sealed_again(tmp_path, name):
    path = write_sealed(tmp_path / "a.json", _bad(_shortv, SHORTV_BAD[name]))
    with pytest.raises(ArtefactError):
        read_artefact(path, num_layers=L)


@pytest.mark.parametrize("ranking", [[3, 1, 0, 2], [0, 1, 3, 2], [3, 0, 2, 1]])
def test_a_tie_is_broken_by_the_lower_layer(tmp_path, ranking):
    a = shortv_artefact(TIES)
    a["ranking"] = ranking
    with pytest.raises(ArtefactError, match="does not follow its scores"):
        check_artefact(a, num_layers=L)


@pytest.mark.parametrize("name", sorted(RL_BAD))
def test_an_inconsistent_redundancylens_artefact_is_refused_even_when_sealed_again(tmp_path, name):
    path = write_sealed(tmp_path / "a.json", _bad(_rl, RL_BAD[name]))
    with pytest.raises(ArtefactError):
        read_artefact(path, num_layers=L)


MANGLE = {
    "truncated": lambda t: t[: len(t) // 2],
    "empty": lambda t: "",
    "unsealed": lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != SEAL_FIELD}),
    "wrong_seal": lambda t: json.dumps({**json.loads(t), SEAL_FIELD: "0" * 64}),
    "edited_ranking_old_seal": lambda t: json.dumps({**json.loads(t), "ranking": [0, 1, 2, 3]}),
    "edited_score_old_seal": lambda t: json.dumps({**json.loads(t), "scores": [0.3, 0.1, 0.2, 0.01]}),
    "duplicate_key": lambda t: t.replace('"ranking": [', '"ranking": [0, 1, 2, 3], "ranking": [', 1),
    "nan_score": lambda t: t.replace("0.3", "NaN", 1),
    "not_an_object": lambda t: "[3, 1, 2, 0]",
}


@pytest.mark.parametrize("name", sorted(MANGLE))
def test_a_corrupt_artefact_file_is_refused(tmp_path, name):
    path = tmp_path / "a.json"
    path.write_text(MANGLE[name](dumps_sealed(_shortv(), indent=1, sort_keys=True)))
    with pytest.raises(ArtefactError):
        read_artefact(path, num_layers=L)


# ---- one behaviour per reader ------------------------------------------------------------------------------
CORRUPTIONS = {**{f"mangle_{k}": ("mangle", v) for k, v in MANGLE.items()},
               **{f"resealed_{k}": ("reseal", v) for k, v in SHORTV_BAD.items() if not k.startswith("no_key")}}


def _corrupt(path, how, fn):
    if how == "mangle":
        path.write_text(fn(path.read_text()))
    else:
        a = {k: v for k, v in json.loads(path.read_text()).items() if k != SEAL_FIELD}
        fn(a)
        path.write_text(dumps_sealed(a, indent=1, sort_keys=True))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_cached_artefact_is_named_once_and_computed_again(tmp_path, name, capsys):
    parts = copy.deepcopy(_shortv()["key_parts"])
    calls = []

    def compute():
        calls.append(1)
        return {"scores": SCORES, "ranking": [3, 1, 2, 0]}

    first = load_or_compute(parts, compute, tmp_path, num_layers=L)
    path = artefact_path(parts, tmp_path)
    assert first["path"] == str(path) and calls == [1]
    _corrupt(path, *CORRUPTIONS[name])
    again = load_or_compute(parts, compute, tmp_path, num_layers=L)
    err = capsys.readouterr().err
    assert calls == [1, 1] and again["ranking"] == [3, 1, 2, 0]
    assert len(err.strip().splitlines()) == 1 and f"invalid calibration artefact {path}" in err
    assert read_artefact(path, key_parts=parts, num_layers=L)["ranking"] == [3, 1, 2, 0]  # replaced whole
    load_or_compute(parts, compute, tmp_path, num_layers=L)
    assert calls == [1, 1] and capsys.readouterr().err == ""  # and reused from then on


def test_an_artefact_of_other_settings_is_computed_again(tmp_path, capsys):
    parts = copy.deepcopy(_shortv()["key_parts"])
    other = dict(_shortv(), key_parts={**parts, "seed": 9})
    _rekey(other)
    path = artefact_path(parts, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sealed(path, other)  # a valid artefact, but of another seed, under this key's name
    out = load_or_compute(parts, lambda: {"scores": SCORES, "ranking": [3, 1, 2, 0]}, tmp_path, num_layers=L)
    assert out["key"] == artefact_key(parts) and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_artefact_given_to_shortv_is_bad_input(tmp_path, name):
    from tests.methods.helpers import tiny
    from harness.models.adapter import get_adapter

    path = write_sealed(tmp_path / "lc.json", _shortv())
    m = methods.build("shortv", {"layers": "auto", "N": 2, "calibration": str(path)})
    ad = get_adapter(tiny()[0])
    m.validate(ad)
    assert m.frozen_layers(L) == [3, 1]
    _corrupt(path, *CORRUPTIONS[name])
    with pytest.raises(MethodError, match=r"^method\.params\.calibration=.*: invalid calibration artefact: "):
        m.validate(ad)


@pytest.mark.parametrize("name", sorted(RL_BAD) + ["unsealed", "kind_hollow_for_ffn", "shortv_artefact"])
def test_a_corrupt_artefact_given_to_redundancylens_is_bad_input(tmp_path, name):
    from tests.methods.helpers import tiny
    from harness.models.adapter import get_adapter

    ad = get_adapter(tiny()[0])
    path = write_sealed(tmp_path / "r.json", _rl())
    m = methods.build("redundancylens", {"ffn_layers": "auto", "ffn_ratio": 0.5, "calibration_ffn": str(path)})
    m.validate(ad)
    assert m.resolved_layers(L) == ([], [3, 1])
    if name == "unsealed":
        path.write_text(json.dumps(json.loads(path.read_text()) | {"ranking": [0, 1, 2, 3]}))
    elif name == "kind_hollow_for_ffn":
        write_sealed(path, redundancylens_artefact([3, 1, 0, 2], kind="hollow", tail=1))
    elif name == "shortv_artefact":
        write_sealed(path, shortv_artefact([0.0, 0.1, 0.2, 0.3]))
    else:
        write_sealed(path, _bad(_rl, RL_BAD[name]))
    with pytest.raises(MethodError, match=r"^method\.params\.calibration_ffn=.*: invalid calibration artefact: "):
        m.validate(ad)
