"""`shapes`: a procedurally generated visual question-answering benchmark.

Each image is a 192x192 white canvas divided into a 4x4 grid of 48-pixel cells (3x3 ViT patches
of 16 pixels each). A cell is empty, holds one coloured shape (circle, square, triangle, diamond,
cross, star; 30-40 px across) or one black capital letter (Pillow's default font, 40-46 px, about 30 px
tall), drawn near the cell centre with a small random offset -- so an object covers several patches
(about 6 on average), like an object in a real photograph, and no single patch holds all of it.
Questions are about *one* cell or need *every* cell:

* ``colour``   -- "What colour is the shape in row 2, column 3?"      (6 answers)
* ``shape``    -- "What shape is in row 2, column 3?"                 (6 answers)
* ``letter``   -- "What letter is in row 2, column 3?"                (26 answers)
* ``position`` -- "Which row is the letter K in?" / "... column ..."  (4 answers)
* ``count``    -- "How many red shapes are there?" / "How many circles are there?" (0-3)

All answers are a lowercase single word or a digit. Answers are balanced per question type, so the
best text-only guess (the most frequent answer per type) is near chance.

`render` also draws the same scene on other canvases (``cell_w`` x ``cell_h`` pixel cells, objects
scaled with the cell): the embedded model is trained on varied image sizes and aspect ratios, as
dynamic-resolution VLMs are, while the benchmark itself is always the 192x192 canvas.

Everything is deterministic by ``seed``: document ``i`` of a split is generated from its own
``random.Random`` seeded with a string derived from ``(seed, split, i)``; no global RNG is used.
(Generator 1.0 drew 11-16 px shapes and 16-19 px letters that fell almost entirely in the cell's
centre patch; 2.0 draws them large enough to span several patches.)
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import string
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GENERATOR_VERSION = "2.0"

IMAGE_SIZE = 192
GRID = 4
CELL = IMAGE_SIZE // GRID  # 48 px = 3x3 patches of 16 px

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
LETTERS = tuple(string.ascii_uppercase)
COUNT_VALUES = (0, 1, 2, 3)

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "letter", "position", "count")

SPLIT_SIZES = {"train": 20000, "val": 500, "test": 500}
SPLITS = tuple(SPLIT_SIZES)

# cell content probabilities
P_EMPTY, P_SHAPE = 0.2, 0.55  # remaining 0.25: letter

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "no": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_SYNONYMS = {"grey": "gray", "color": "colour", "violet": "purple", "plus": "cross", "rhombus": "diamond"}


# --------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------
def split_seed(seed: int, split: str, version: str = GENERATOR_VERSION) -> str:
    """A string seed for `split`; different splits never share documents."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return hashlib.sha256(f"shapes-v{version}:{int(seed)}:{split}".encode()).hexdigest()[:24]


def doc_rng(seed: int, split: str, index: int, version: str = GENERATOR_VERSION) -> random.Random:
    return random.Random(f"{split_seed(seed, split, version)}:{int(index)}")


# --------------------------------------------------------------------------------------------------
# scenes and rendering
# --------------------------------------------------------------------------------------------------
_FONT_CACHE: dict[int, ImageFont.ImageFont] = {}


def _font(size: int):
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        except TypeError:  # very old Pillow without FreeType: the fixed bitmap font
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


# object sizes (px on the 48-pixel cell) and centre offsets by generator version; 1.0 is kept so that the
# previous embedded model can be measured on the data it was trained for (`harness.tiny_model.card`)
_SIZES = {
    "2.0": {"shape": (30, 40), "letter": (40, 46), "offset": 3},
    "1.0": {"shape": (11, 16), "letter": (16, 19), "offset": 2},
}


def make_scene(rng: random.Random, p_empty: float = P_EMPTY, version: str = GENERATOR_VERSION) -> list[dict]:
    """Random cell contents: a list of GRID*GRID dicts (row-major) with a 'kind' key.

    kind 'empty'; kind 'shape' with 'shape', 'colour', 'size', 'dx', 'dy'; kind 'letter' with
    'letter', 'size', 'dx', 'dy'. Letters are distinct within a scene. `p_empty` (the probability
    of an empty cell; the benchmark uses the default) lets a training curriculum start from sparse
    scenes; shapes and letters keep their 55:25 ratio.
    """
    if version not in _SIZES:
        raise ValueError(f"unknown shapes generator version {version!r}; choose from {sorted(_SIZES)}")
    sz = _SIZES[version]
    off = sz["offset"]
    cells = []
    letters = list(LETTERS)
    rng.shuffle(letters)
    p_shape = P_SHAPE if p_empty == P_EMPTY else (1.0 - p_empty) * P_SHAPE / (1.0 - P_EMPTY)
    for _ in range(GRID * GRID):
        u = rng.random()
        if u < p_empty:
            cells.append({"kind": "empty"})
        elif u < p_empty + p_shape:
            cells.append({
                "kind": "shape",
                "shape": rng.choice(SHAPES),
                "colour": rng.choice(COLOUR_NAMES),
                "size": rng.randint(*sz["shape"]),
                "dx": rng.randint(-off, off),
                "dy": rng.randint(-off, off),
            })
        else:
            cells.append({
                "kind": "letter",
                "letter": letters.pop(),
                "size": rng.randint(*sz["letter"]),
                "dx": rng.randint(-off, off),
                "dy": rng.randint(-off, off),
            })
    return cells


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render(cells: list[dict], cell_w: int = CELL, cell_h: int = CELL) -> Image.Image:
    """Draw a scene as an RGB image of GRID x GRID cells of `cell_w` x `cell_h` pixels (the benchmark:
    48 x 48, a 192x192 image). Sizes and offsets are in units of the 48-pixel cell and scale with
    min(cell_w, cell_h), so a smaller or wider canvas shows the same scene."""
    k = min(cell_w, cell_h) / CELL
    img = Image.new("RGB", (GRID * cell_w, GRID * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for idx, c in enumerate(cells):
        row, col = divmod(idx, GRID)
        cx = col * cell_w + cell_w // 2 + c.get("dx", 0) * k
        cy = row * cell_h + cell_h // 2 + c.get("dy", 0) * k
        if c["kind"] == "shape":
            s = c["size"] * k
            r = s / 2
            fill = COLOURS[c["colour"]]
            box = (cx - r, cy - r, cx + r, cy + r)
            kind = c["shape"]
            if kind == "circle":
                draw.ellipse(box, fill=fill)
            elif kind == "square":
                q = r * 0.85
                draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
            elif kind == "triangle":
                draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
            elif kind == "diamond":
                draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
            elif kind == "cross":
                w = max(2.0, r * 0.35)
                draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
                draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
            elif kind == "star":
                draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
        elif c["kind"] == "letter":
            draw.text((cx, cy), c["letter"], fill=(0, 0, 0), font=_font(max(8, round(c["size"] * k))), anchor="mm")
    return img


BACKGROUND = (255, 255, 255)


def object_mask(image, cell: int):
    """[H, W] float32 array, 1 on the pixels of the object drawn in `cell` (row-major) of a rendered
    scene, 0 elsewhere: the non-background pixels of that cell's square (every object is drawn inside its
    own cell on the white canvas; a letter's anti-aliased edge pixels count as the letter's). An empty
    cell gives all zeros. Used by the asked-object recall (`harness.recall`)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    r, c = divmod(int(cell), GRID)
    y0, y1 = r * h // GRID, (r + 1) * h // GRID
    x0, x1 = c * w // GRID, (c + 1) * w // GRID
    m = np.zeros((h, w), dtype=np.float32)
    m[y0:y1, x0:x1] = (a[y0:y1, x0:x1] != np.array(BACKGROUND, dtype=a.dtype)).any(-1)
    return m


# --------------------------------------------------------------------------------------------------
# questions
# --------------------------------------------------------------------------------------------------
def _where(row: int, col: int) -> str:
    return f"row {row + 1}, column {col + 1}"


def make_question(cells: list[dict], qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of `qtype` about `cells`, or None if the scene has no such question."""
    idx_shape = [i for i, c in enumerate(cells) if c["kind"] == "shape"]
    idx_letter = [i for i, c in enumerate(cells) if c["kind"] == "letter"]
    if qtype in ("colour", "shape"):
        if not idx_shape:
            return None
        # pick the target answer first (uniform), then a cell that has it: balanced answers
        values = COLOUR_NAMES if qtype == "colour" else SHAPES
        key = qtype
        order = list(values)
        rng.shuffle(order)
        for v in order:
            cand = [i for i in idx_shape if cells[i][key] == v]
            if cand:
                i = rng.choice(cand)
                r, c = divmod(i, GRID)
                q = (f"What colour is the shape in {_where(r, c)}?" if qtype == "colour"
                     else f"What shape is in {_where(r, c)}?")
                return q, v
        return None
    if qtype == "letter":
        if not idx_letter:
            return None
        i = rng.choice(idx_letter)
        r, c = divmod(i, GRID)
        return f"What letter is in {_where(r, c)}?", cells[i]["letter"].lower()
    if qtype == "position":
        if not idx_letter:
            return None
        axis = rng.choice(("row", "column"))
        # balanced: choose the target row/column first
        order = list(range(GRID))
        rng.shuffle(order)
        for v in order:
            cand = [i for i in idx_letter if divmod(i, GRID)[0 if axis == "row" else 1] == v]
            if cand:
                i = rng.choice(cand)
                return f"Which {axis} is the letter {cells[i]['letter']} in?", str(v + 1)
        return None
    if qtype == "count":
        colour_counts = Counter(cells[i]["colour"] for i in idx_shape)
        shape_counts = Counter(cells[i]["shape"] for i in idx_shape)
        options = [("colour", v, colour_counts.get(v, 0)) for v in COLOUR_NAMES]
        options += [("shape", v, shape_counts.get(v, 0)) for v in SHAPES]
        targets = list(COUNT_VALUES)
        rng.shuffle(targets)
        for t in targets:
            cand = [o for o in options if o[2] == t]
            if cand:
                kind, v, n = rng.choice(cand)
                if kind == "colour":
                    return f"How many {v} shapes are there?", str(n)
                return f"How many {SHAPE_PLURALS[v]} are there?", str(n)
        return None
    raise ValueError(f"unknown question type {qtype!r}")


def scene_questions(cells: list[dict], rng: random.Random, k: int) -> list[tuple[str, str, str]]:
    """`k` (qtype, question, answer) triples about one scene (question types cycle in random order)."""
    out = []
    types = list(QUESTION_TYPES)
    tries = 0
    while len(out) < k and tries < 10 * k:
        if tries % len(types) == 0:
            rng.shuffle(types)
        qt = types[tries % len(types)]
        tries += 1
        qa = make_question(cells, qt, rng)
        if qa is not None:
            out.append((qt, qa[0], qa[1]))
    return out


def make_doc(seed: int, split: str, index: int, version: str = GENERATOR_VERSION, with_cells: bool = False) -> dict:
    """Document `index` of `split` (question type cycles through QUESTION_TYPES); `with_cells` adds the
    scene itself ("cells", see `make_scene`) for analyses that need the ground truth."""
    rng = doc_rng(seed, split, index, version)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        cells = make_scene(rng, version=version)
        qa = make_question(cells, qtype, rng)
        if qa is not None:
            break
    doc = {
        "id": f"shapes-{split}-{index:06d}",
        "image": render(cells),
        "question": qa[0],
        "answer": qa[1],
        "qtype": qtype,
    }
    if with_cells:
        doc["cells"] = cells
    return doc


def generate(split: str, n: int | None = None, seed: int = 0, version: str = GENERATOR_VERSION,
             with_cells: bool = False) -> list[dict]:
    """`n` documents of `split` ('train' | 'val' | 'test'), deterministic by `seed`.

    Each doc: {"id", "image" (PIL RGB 192x192), "question", "answer", "qtype"} (+ "cells" with
    `with_cells`). `version` "1.0" regenerates the previous generator's documents.
    """
    split_seed(seed, split, version)  # validates the split
    n = SPLIT_SIZES[split] if n is None else int(n)
    return [make_doc(seed, split, i, version, with_cells) for i in range(n)]


_PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}


def question_target(qtype: str, question: str) -> dict:
    """What a question asks about, parsed from its text: {"row", "col"} (0-based) of the named cell
    (colour / shape / letter), {"letter"} (position), {"colour"} or {"shape"} counted (count)."""
    if qtype in ("colour", "shape", "letter"):
        m = re.search(r"row (\d+), column (\d+)", question)
        return {"row": int(m.group(1)) - 1, "col": int(m.group(2)) - 1}
    if qtype == "position":
        return {"letter": re.search(r"letter (\w)", question).group(1)}
    if qtype == "count":
        w = question.split("How many ")[1].split(" ")[0]
        return {"colour": w} if w in COLOURS else {"shape": _PLURAL_TO_SHAPE.get(w)}
    raise ValueError(f"unknown question type {qtype!r}")


def question_cells(cells: list[dict], qtype: str, question: str) -> list[int]:
    """The grid cells (row-major) holding the objects a question asks about: the named cell (colour,
    shape, letter), the letter's cell (position), the counted objects (count; [] for a count of 0)."""
    t = question_target(qtype, question)
    if "row" in t:
        return [t["row"] * GRID + t["col"]]
    key, value = next(iter(t.items()))
    return [i for i, c in enumerate(cells) if c.get(key) == value]



# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lowercase, strip punctuation/whitespace, keep the first word, number words -> digits."""
    if s is None:
        return ""
    s = str(s).lower().strip()
    s = re.sub(r"[^\w\s]", " ", s)
    words = s.split()
    if not words:
        return ""
    w = words[0]
    w = _NUMBER_WORDS.get(w, w)
    return _SYNONYMS.get(w, w)


def score(prediction: str, target: str) -> float:
    """Exact match after `normalize_answer`."""
    return float(normalize_answer(prediction) == normalize_answer(target) and normalize_answer(target) != "")


def answer_prior(docs) -> dict[str, str]:
    """Most frequent answer per question type."""
    by = defaultdict(Counter)
    for d in docs:
        by[d["qtype"]][normalize_answer(d["answer"])] += 1
    return {qt: c.most_common(1)[0][0] for qt, c in by.items()}


def prior_baseline(docs, prior: dict[str, str] | None = None) -> float:
    """Accuracy of always answering the most frequent answer of each question type.

    By default the prior is fitted on `docs` themselves (an optimistic upper bound of any
    text-only guess).
    """
    docs = list(docs)
    prior = prior or answer_prior(docs)
    if not docs:
        return 0.0
    return sum(score(prior.get(d["qtype"], ""), d["answer"]) for d in docs) / len(docs)


# --------------------------------------------------------------------------------------------------
# on-disk data
# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _content_digest(rows) -> str:
    """sha256 over (id, question, answer, qtype, sha256 of the PNG bytes) of every row, in order."""
    h = hashlib.sha256()
    for rid, question, answer, qtype, png in rows:
        h.update(json.dumps([rid, question, answer, qtype, hashlib.sha256(png).hexdigest()]).encode() + b"\n")
    return h.hexdigest()


_GENERATOR_DIGESTS: dict[tuple, str] = {}


def generator_digest(split: str, n: int, seed: int = 0) -> str:
    """What the generator produces for (split, n, seed): the trust anchor of the files on disk."""
    key = (split, n, seed, GENERATOR_VERSION)
    if key not in _GENERATOR_DIGESTS:
        _GENERATOR_DIGESTS[key] = _content_digest(
            (d["id"], d["question"], d["answer"], d["qtype"], _png(d["image"])) for d in generate(split, n, seed=seed))
    return _GENERATOR_DIGESTS[key]


def file_digest(path: Path) -> str:
    """The same digest of a parquet file written by `ensure_data` (ValueError if unreadable)."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["id", "question", "answer", "qtype", "image"]).to_pydict()
        return _content_digest(zip(t["id"], t["question"], t["answer"], t["qtype"],
                                   (im["bytes"] for im in t["image"])))
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise ValueError(f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def verify(path: Path, split: str, seed: int = 0, n: int | None = None) -> None:
    """Raise ValueError unless the file holds exactly what the generator makes for (split, n, seed).

    Checked against the generator itself, never against a checksum stored beside the data (which could
    be deleted or rewritten with it). A file verified once is remembered by its sha256 (itself cached by
    the file's size, mtime, ctime and inode), so an unchanged file costs a stat on the next run."""
    from harness.fingerprint import cache_dir, file_digests

    n = SPLIT_SIZES[split] if n is None else n
    sha = file_digests([path], "benchmark data")[path]
    memo = cache_dir() / "shapes-verified.json"
    tag = f"{seed}/{split}/{n}/{GENERATOR_VERSION}"
    try:
        known = json.loads(memo.read_text())
        if isinstance(known, dict) and known.get(tag) == sha:
            return
    except (OSError, ValueError):
        known = {}
    if file_digest(path) != generator_digest(split, n, seed):
        raise ValueError("its content differs from what the generator makes (altered data)")
    try:
        known = known if isinstance(known, dict) else {}
        known[tag] = sha
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".shapes.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, sort_keys=True)
        os.replace(tmp, memo)
    except OSError:
        pass


def _write_parquet(docs: list[dict], path: Path, pngs: list[bytes] | None = None) -> None:
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    features = Features({
        "id": Value("string"),
        "image": HFImage(),
        "question": Value("string"),
        "answer": Value("string"),
        "qtype": Value("string"),
    })
    pngs = [_png(d["image"]) for d in docs] if pngs is None else pngs
    rows = [{**d, "image": {"bytes": png, "path": None}} for d, png in zip(docs, pngs)]
    ds = Dataset.from_list(rows, features=features)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".parquet.tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_data(data_dir: str | os.PathLike, seed: int = 0, splits=("val", "test"),
                sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `{split}.parquet` for `splits` under `data_dir` if missing, plus `meta.json`.

    The train split (20k docs) is generated on the fly by the training script and is only written
    when asked for explicitly. Returns {split: path}.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    meta_path = data_dir / "meta.json"
    meta = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    if meta.get("generator_version") not in (None, GENERATOR_VERSION) or meta.get("seed", seed) != seed:
        meta = {}  # stale: regenerate everything asked for
        for s in splits:
            (data_dir / f"{s}.parquet").unlink(missing_ok=True)
    paths = {}
    changed = False
    for s in splits:
        p = data_dir / f"{s}.parquet"
        n = sizes[s]
        if not p.exists() or meta.get("counts", {}).get(s) not in (None, n):
            docs = generate(s, n, seed=seed)
            pngs = [_png(d["image"]) for d in docs]
            _write_parquet(docs, p, pngs)
            # what the generator makes, from the documents it just made (verify() compares the file to it)
            _GENERATOR_DIGESTS.setdefault((s, n, seed, GENERATOR_VERSION), _content_digest(
                (d["id"], d["question"], d["answer"], d["qtype"], png) for d, png in zip(docs, pngs)))
            changed = True
        paths[s] = p
        if s not in meta.get("sha256", {}):
            changed = True
    if changed or not meta_path.exists():
        meta = {
            "benchmark": "shapes",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "counts": {**meta.get("counts", {}), **{s: sizes[s] for s in splits}},
            "sha256": {**meta.get("sha256", {}), **{s: _sha256(paths[s]) for s in splits}},
        }
        fd, tmp = tempfile.mkstemp(prefix=".meta.", suffix=".json.tmp", dir=data_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp, meta_path)
    return paths
