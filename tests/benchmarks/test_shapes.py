"""Tests of the built-in `shapes` benchmark (fast: a few seconds)."""
from __future__ import annotations

import io
import json
from collections import Counter

import pytest

from harness.benchmarks import shapes as S


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_doc_schema():
    docs = S.generate("val", 20, seed=0)
    assert len(docs) == 20
    for d in docs:
        assert set(d) == {"id", "image", "question", "answer", "qtype"}
        assert d["image"].mode == "RGB" and d["image"].size == (S.IMAGE_SIZE, S.IMAGE_SIZE)
        assert d["qtype"] in S.QUESTION_TYPES
        assert d["answer"] == d["answer"].lower().strip() and " " not in d["answer"]
        assert S.normalize_answer(d["answer"]) == d["answer"]
        assert d["question"].endswith("?")
    assert len({d["id"] for d in docs}) == 20
    assert {d["qtype"] for d in docs} == set(S.QUESTION_TYPES)


def test_deterministic_by_seed():
    a = S.generate("test", 12, seed=0)
    b = S.generate("test", 12, seed=0)
    for x, y in zip(a, b):
        assert (x["id"], x["question"], x["answer"], x["qtype"]) == (y["id"], y["question"], y["answer"], y["qtype"])
        assert _png(x["image"]) == _png(y["image"])
    # prefixes agree: doc i does not depend on n
    c = S.generate("test", 5, seed=0)
    assert [_png(d["image"]) for d in c] == [_png(d["image"]) for d in a[:5]]


def test_splits_and_seeds_differ():
    t = S.generate("test", 10, seed=0)
    v = S.generate("val", 10, seed=0)
    tr = S.generate("train", 10, seed=0)
    t1 = S.generate("test", 10, seed=1)
    imgs = lambda docs: {_png(d["image"]) for d in docs}  # noqa: E731
    assert not imgs(t) & imgs(v)
    assert not imgs(t) & imgs(tr)
    assert not imgs(v) & imgs(tr)
    assert not imgs(t) & imgs(t1)
    assert S.split_seed(0, "test") != S.split_seed(0, "val")
    with pytest.raises(ValueError):
        S.generate("dev", 1)


def test_answers_balanced_and_prior_near_chance():
    docs = S.generate("test", 500, seed=0)
    by = {qt: Counter(d["answer"] for d in docs if d["qtype"] == qt) for qt in S.QUESTION_TYPES}
    n_answers = {"colour": 6, "shape": 6, "letter": 26, "position": 4, "count": 4}
    answer_sets = {"colour": set(S.COLOUR_NAMES), "shape": set(S.SHAPES), "letter": {x.lower() for x in S.LETTERS},
                   "position": {"1", "2", "3", "4"}, "count": {"0", "1", "2", "3"}}
    for qt, c in by.items():
        assert sum(c.values()) == 100
        assert len(c) >= min(n_answers[qt], 20), (qt, c)
        assert set(c) <= answer_sets[qt]
        # the most frequent answer is not much above uniform
        assert c.most_common(1)[0][1] / 100 <= 1.0 / n_answers[qt] + 0.15, (qt, c)
    prior = S.prior_baseline(docs)
    chance = sum(1.0 / n for n in n_answers.values()) / len(n_answers)
    assert prior < chance + 0.10, (prior, chance)
    assert prior < 0.30
    assert set(S.answer_prior(docs)) == set(S.QUESTION_TYPES)


def test_questions_depend_on_the_image():
    """The same question text appears with different answers: the text alone does not tell."""
    docs = S.generate("train", 400, seed=0)
    answers = {}
    for d in docs:
        answers.setdefault(d["question"], set()).add(d["answer"])
    ambiguous = [q for q, a in answers.items() if len(a) > 1]
    assert len(ambiguous) >= 20


def test_question_refers_to_cell_contents():
    rng = S.doc_rng(0, "train", 3)
    cells = S.make_scene(rng)
    for qt in S.QUESTION_TYPES:
        qa = S.make_question(cells, qt, rng)
        if qa is None:
            continue
        q, a = qa
        if qt in ("colour", "shape", "letter"):
            r = int(q.split("row ")[1].split(",")[0]) - 1
            c = int(q.split("column ")[1].rstrip("?")) - 1
            cell = cells[r * S.GRID + c]
            expected = {"colour": cell.get("colour"), "shape": cell.get("shape"),
                        "letter": (cell.get("letter") or "").lower()}[qt]
            assert a == expected


def test_normalize_and_score():
    n = S.normalize_answer
    assert n("  Red. ") == "red"
    assert n("Three") == "3"
    assert n("3 shapes") == "3"
    assert n("zero") == "0"
    assert n("grey") == "gray"
    assert n("") == "" and n(None) == ""
    assert n("K!") == "k"
    assert S.score("Red", "red") == 1.0
    assert S.score("two", "2") == 1.0
    assert S.score("blue", "red") == 0.0
    assert S.score("", "") == 0.0
    assert S.score("circle square", "circle") == 1.0


def test_parquet_roundtrip(tmp_path):
    from datasets import load_dataset

    paths = S.ensure_data(tmp_path, seed=0, sizes={"val": 12, "test": 10})
    assert set(paths) == {"val", "test"}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["counts"] == {"val": 12, "test": 10}
    assert meta["generator_version"] == S.GENERATOR_VERSION
    assert set(meta["sha256"]) == {"val", "test"}
    ds = load_dataset("parquet", data_files={"test": str(paths["test"])})["test"]
    ref = S.generate("test", 10, seed=0)
    assert len(ds) == 10
    for row, d in zip(ds, ref):
        assert row["question"] == d["question"] and row["answer"] == d["answer"] and row["qtype"] == d["qtype"]
        assert row["id"] == d["id"]
        assert list(row["image"].convert("RGB").getdata()) == list(d["image"].getdata())
    # only written when missing: a second call keeps the files untouched
    mtime = paths["test"].stat().st_mtime_ns
    S.ensure_data(tmp_path, seed=0, sizes={"val": 12, "test": 10})
    assert paths["test"].stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))


# ---- generator 2.0: objects that span several patches; other canvases; version 1.0 kept ------------------
def _patches_covered(image, cell, min_pixels=26):
    import numpy as np

    m = S.object_mask(image, cell)
    g = m.shape[0] // 16
    return int((m.reshape(g, 16, g, 16).sum((1, 3)) >= min_pixels).sum())


def test_objects_span_several_patches_and_version_1_kept_its_small_ones():
    import numpy as np

    def spread(version):
        docs = S.generate("val", 40, version=version, with_cells=True)
        return np.mean([_patches_covered(d["image"], k) for d in docs for k, c in enumerate(d["cells"])
                        if c["kind"] != "empty"])

    assert spread("2.0") >= 4.0
    assert spread("1.0") < 1.5
    assert S.generate("val", 3, version="1.0")[0]["question"] != "" and S.GENERATOR_VERSION == "2.0"
    with pytest.raises(ValueError, match="version"):
        S.make_scene(S.doc_rng(0, "val", 0), version="9.9")


def test_render_on_other_canvases_shows_the_same_scene():
    import numpy as np

    d = S.generate("val", 1, with_cells=True)[0]
    for cw, ch in ((32, 64), (64, 40), (48, 48)):
        img = S.render(d["cells"], cw, ch)
        assert img.size == (S.GRID * cw, S.GRID * ch)
        a = np.asarray(img)
        for k, c in enumerate(d["cells"]):  # an object stays inside its own cell, an empty cell stays white
            r, col = divmod(k, S.GRID)
            inside = (a[r * ch:(r + 1) * ch, col * cw:(col + 1) * cw] != 255).any(-1).sum()
            assert (inside > 0) == (c["kind"] != "empty"), (cw, ch, k)
    assert np.array_equal(np.asarray(S.render(d["cells"])), np.asarray(d["image"]))


def test_question_cells_name_the_asked_objects():
    docs = S.generate("val", 60, with_cells=True)
    for d in docs:
        cells = S.question_cells(d["cells"], d["qtype"], d["question"])
        if d["qtype"] == "count":
            assert len(cells) == int(d["answer"])
        elif d["qtype"] == "position":
            (k,) = cells
            axis = 0 if "row" in d["question"] else 1
            assert str(divmod(k, S.GRID)[axis] + 1) == d["answer"]
        else:
            (k,) = cells
            c = d["cells"][k]
            assert d["answer"] in (c.get("colour"), c.get("shape"), c.get("letter", "").lower())
