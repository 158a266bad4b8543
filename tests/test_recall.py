"""Asked-object recall (harness/recall.py): the cell a shapes question names, its patches on any patch grid,
the asked object's pixels per patch (plain per-pixel reference), and the recall read from what the
patched model did: a constructed reduction that keeps exactly the asked cell's visual tokens gives 1, one
that keeps none of them gives 0 (from its layer on; earlier layers are not counted), for every asked cell
and several language models; FastV's recall equals the share of asked patches among its kept tokens;
methods that keep every token (none, ShortV) give 1, blind 0; merged tokens count by the object's share
of them (ToMe / FiCoCo-V bookkeeping, FiCoCo-L's logged merges, a hand-built merge)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import methods
from harness import recall as R
from harness.models.adapter import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR

_CACHE: dict = {}


def tiny(family="llava", lm="llama", gqa=False):
    key = (family, lm, gqa)
    if key not in _CACHE:
        _CACHE[key] = build_tiny(family, lm, gqa=gqa)
    model, proc = _CACHE[key]
    return copy.deepcopy(model), proc


def batch(proc, questions):
    from tests.efficiency.helpers import image, prompt

    return proc(images=[image(i) for i in range(len(questions))], text=[prompt(proc, q) for q in questions],
                return_tensors="pt", padding=True)


def question(cell):
    r, c = divmod(cell, 4)
    return f"What colour is the shape in row {r + 1}, column {c + 1}?"


def test_asked_cell_and_patches():
    assert R.asked_cell("What letter is in row 2, column 3?") == 6
    assert R.asked_cell("How many circles are there?") is None
    assert R.asked_cell("Which row is the letter K in?") is None
    # the tiny model's 12x12 grid: a cell is 3x3 whole patches; 24x24 (LLaVA-1.5): 6x6
    assert R.cell_patch_weights(6, 12) == {r * 12 + c: 1.0 for r in (3, 4, 5) for c in (6, 7, 8)}
    assert sum(R.cell_patch_weights(15, 24).values()) == 36
    # a grid that does not divide the cells: fractional overlaps, the cells still tile the image
    w = [R.cell_patch_weights(c, 10) for c in range(16)]
    assert math.isclose(sum(sum(x.values()) for x in w), 100.0)


class KeepPatches(LR.ReductionPlan):
    """Keeps only (keep=True) or drops only (keep=False) each sample's asked patches at `layer`."""

    def __init__(self, layer, asked, keep):
        self.first_layer, self.asked, self.keep = layer, asked, keep

    def before_layer(self, view):
        if view.layer != self.first_layer:
            return None
        visual = view.visual
        ordinal = visual.long().cumsum(1) - 1
        rows = []
        for b in range(visual.shape[0]):
            hit = torch.tensor([bool(visual[b, j]) and int(ordinal[b, j]) in self.asked[b] for j in range(visual.shape[1])])
            drop = visual[b] & (~hit if self.keep else hit)
            rows.append(torch.arange(visual.shape[1])[~drop])
        return torch.stack(rows)


@pytest.mark.parametrize("lm,gqa", [("llama", False), ("mistral", True), ("qwen2", True)])
@pytest.mark.parametrize("keep,layer", [(True, 0), (False, 0), (False, 2)])
def test_constructed_keep_exactly_or_none_of_the_asked_cell(lm, gqa, keep, layer):
    model, proc = tiny("llava", lm, gqa)
    ad = get_adapter(model)
    cells = [0, 5, 10, 15]  # four asked cells, one per sample (same count each: equal per-sample budgets)
    side = math.isqrt(ad.visual_tokens_per_image)
    asked = [set(R.cell_patch_weights(c, side)) for c in cells]
    LR.install(model, ad, KeepPatches(layer, asked, keep))
    inp = batch(proc, [question(c) for c in cells])
    with torch.no_grad():
        model(**inp)
    got = R.layer_recall(model, ad, inp["input_ids"], [question(c) for c in cells])
    L = ad.num_llm_layers
    expected = [1.0] * L if keep else [None] * layer + [0.0] * (L - layer)  # counted from the layer it acts at
    assert got == [expected] * len(cells)


@pytest.mark.parametrize("family", ["llava"])
def test_fastv_recall_is_the_asked_share_of_its_kept_tokens(family):
    model, proc = tiny(family, "qwen2", True)
    ad = get_adapter(model)
    methods.build("fastv", {"K": 2, "keep_ratio": 0.25}).apply(model, ad)
    cells = [3, 9]
    inp = batch(proc, [question(c) for c in cells])
    with torch.no_grad():
        model(**inp)
    got = R.layer_recall(model, ad, inp["input_ids"], [question(c) for c in cells])
    st = LR.get_reducer(model).state
    visual = inp["input_ids"] == model.config.image_token_id
    side = math.isqrt(ad.visual_tokens_per_image)
    for b, c in enumerate(cells):
        kept = {int(k) for k in (visual[b].long().cumsum(0) - 1)[st.cache_idx[2][b]][visual[b][st.cache_idx[2][b]]]}
        share = sum(w for p, w in R.cell_patch_weights(c, side).items() if p in kept) / 4.0
        assert got[b][:2] == [None, None] and got[b][2:] == [share, share]  # layers before K: not counted


@pytest.mark.parametrize("name,params", [("none", {}), ("shortv", {"layers": [0, 1, 2, 3]})])
def test_methods_that_keep_every_token_give_one(name, params):
    model, proc = tiny()
    ad = get_adapter(model)
    methods.build(name, params).apply(model, ad)
    inp = batch(proc, [question(1), "How many circles are there?"])
    with torch.no_grad():
        model(**inp)
    got = R.layer_recall(model, ad, inp["input_ids"], [question(1), "How many circles are there?"])
    assert got == [[1.0] * ad.num_llm_layers, None]


@pytest.mark.parametrize("params", [{"final_ratio": 0.5, "start_layer": 1}, {"final_ratio": 0.25, "start_layer": 1, "variant": "code"}])
def test_ficoco_l_merges_count_in_proportion(params):
    """FiCoCo-L: layers up to the first merge see all the content; from the layer after a merge the recall
    follows the logged merge weights; all 16 cells' recalls add up to the visual tokens alive there."""
    model, proc = tiny()
    ad = get_adapter(model)
    methods.build("ficoco_l", params).apply(model, ad)
    qs = [question(c) for c in range(16)]
    inp = batch(proc, [qs[0]])
    with torch.no_grad():
        model(**inp)
    st = LR.get_reducer(model).state
    assert st.merges
    got = [R.layer_recall(model, ad, inp["input_ids"], [q])[0] for q in qs]
    side = math.isqrt(ad.visual_tokens_per_image)
    first = min(st.merges)
    for g in got:
        assert g[: first + 1] == [None] * (first + 1)  # up to the first merge: before the method acts
    alive = ad.visual_tokens_per_image
    for i in range(first + 1, ad.num_llm_layers):
        alive -= st.merges[i - 1][0].shape[1] if i - 1 in st.merges else 0
        total = sum(g[i] * sum(R.cell_patch_weights(c, side).values()) for c, g in enumerate(got))
        assert math.isclose(total, alive, rel_tol=1e-4)
    assert min(g[-1] for g in got) < 1.0


def test_vision_merges_without_content_bookkeeping_are_not_measured():
    model, proc = S_model()
    ad = get_adapter(model)
    methods.build("ficoco_v", {"prompt_tokens": 0.5, "start_layer": 0}).apply(model, ad)
    R.track(model, False)  # merged without the bookkeeping: the recall cannot be read
    inp = batch(proc, [question(2)])
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=1, do_sample=False)
    assert R.layer_recall(model, ad, inp["input_ids"], [question(2)]) == [None]


def S_model():
    from tests.methods.helpers import fresh_model, processor

    return fresh_model("llava"), processor("llava")


@pytest.mark.parametrize("name,params", [("tome", {"prompt_tokens": 0.5}), ("tome", {"prompt_tokens": 0.25}),
                                         ("ficoco_v", {"prompt_tokens": 0.5, "start_layer": 0}),
                                         ("ficoco_v", {"prompt_tokens": 0.25, "start_layer": 0, "correlate": "ref"})])
def test_vision_merged_tokens_count_in_proportion(name, params):
    """ToMe / FiCoCo-V: the recall is the asked patches' share of the tokens entering the LLM (by the
    reducer's merge weights); it is below 1 once asked patches are merged with others, equals a direct
    reconstruction from the merge bookkeeping, and the shares of all 16 cells add up to the tokens."""
    from methods._shared.vision_reduce import last_vision_state

    model, proc = S_model()
    ad = get_adapter(model)
    methods.build(name, params).apply(model, ad)
    R.track(model, True)
    qs = [question(c) for c in range(16)]
    inp = batch(proc, [qs[0]])
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=1, do_sample=False)
    st = last_vision_state(model)
    assert st.source is not None and torch.allclose(st.source.sum(-1), torch.ones_like(st.source[..., 0]), atol=1e-5)
    got = [R.layer_recall(model, ad, inp["input_ids"], [q])[0] for q in qs]
    L = ad.num_llm_layers
    side = math.isqrt(ad.visual_tokens_per_image)
    for c, g in enumerate(got):
        assert len(g) == L and len(set(g)) == 1 and 0.0 <= g[0] <= 1.0 + 1e-6
        w = R.cell_patch_weights(c, side)
        direct = sum(float(st.source[0, t, 1 + p]) * wp
                     for t in range(1, st.source.shape[1]) for p, wp in w.items()) / sum(w.values())
        assert math.isclose(g[0], direct, rel_tol=1e-5)
    assert min(g[0] for g in got) < 1.0
    # every token's content is a weighted average summing to one: the cells' recalls times their weight
    # add up to the number of tokens entering the LLM
    n_tokens = st.source.shape[1] - 1
    assert math.isclose(sum(g[0] * sum(R.cell_patch_weights(c, side).values()) for c, g in enumerate(got)),
                        n_tokens, rel_tol=1e-4)
    R.track(model, False)
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=1, do_sample=False)
    assert last_vision_state(model).source is None  # off for timing


def test_summary():
    s = R.summarize({"a": [1.0, 0.0], "b": None, "c": [1.0, 1.0]})
    assert s == {"mean": 0.75, "per_layer": [1.0, 0.5], "n": 2}
    assert R.summarize({"a": None}) is None
    # layers before the method acts (None) are not counted: per sample the mean of its counted layers
    s = R.summarize({"a": [None, 0.5, 0.0], "b": [None, 1.0, 1.0]})
    assert s == {"mean": 0.625, "per_layer": [None, 0.75, 0.5], "n": 2}


@pytest.mark.parametrize("name,params", [("tome", {}), ("tome", {"order": "spatial"}),
                                         ("ficoco_v", {}), ("ficoco_v", {"correlate": "ref", "local_penalty": False})])
def test_content_bookkeeping_follows_the_merge_computation(name, params):
    """The reducers' share bookkeeping is the merge applied to one-hot features: feeding x = the current
    shares (identity at first) through two merges gives x_new == the shares the state records."""
    from methods._shared.vision_reduce import VisionState

    torch.manual_seed(0)
    B, H, dh, grid = 2, 2, 4, 4
    N = 1 + grid * grid
    m = methods.build(name, params)
    reducer = m.make_reducer({0: 3, 1: 2}, type("A", (), {"patches_per_side": grid})())
    state = VisionState(size=None, pos=torch.arange(N).expand(B, N), track=True)
    x = torch.eye(N).expand(B, N, N).clone()
    for layer, r in ((0, 3), (1, 2)):
        n = x.shape[1]
        q, k = torch.randn(B, H, n, dh), torch.randn(B, H, n, dh)
        x = reducer.reduce(layer, x, q, k, state, r)
        torch.testing.assert_close(x, state.source, atol=1e-5, rtol=1e-5)
    assert x.shape[1] == N - 5


# ---- the asked object's pixels (shapes.object_mask) instead of the cell's 9 patches ----------------------
def plain_patch_shares(mask, side):
    """Plain reference: each pixel's area split over the patches it overlaps, by loops."""
    H, W = len(mask), len(mask[0])
    total = sum(sum(r) for r in mask)
    out = {}
    for y in range(H):
        for x in range(W):
            if not mask[y][x]:
                continue
            for i in range(side):
                oy = max(0.0, min(y + 1, (i + 1) * H / side) - max(y, i * H / side))
                for j in range(side):
                    ox = max(0.0, min(x + 1, (j + 1) * W / side) - max(x, j * W / side))
                    if oy * ox:
                        out[i * side + j] = out.get(i * side + j, 0.0) + mask[y][x] * oy * ox / total
    return out


@pytest.mark.parametrize("side", [4, 5, 12])
def test_object_patch_weights_match_a_per_pixel_reference(side):
    g = torch.Generator().manual_seed(side)
    mask = (torch.rand(24, 24, generator=g) < 0.2).float().tolist()
    got = R.object_patch_weights(mask, side)
    ref = plain_patch_shares(mask, side)
    assert got.keys() == ref.keys() and all(math.isclose(got[k], ref[k], rel_tol=1e-9) for k in ref)
    assert math.isclose(sum(got.values()), 1.0)
    assert R.object_patch_weights([[0.0] * 4] * 4, 2) == {}


def test_object_mask_is_the_object_drawn_alone():
    """The mask of a cell is the non-white pixels of a scene where only that cell's object is drawn."""
    import numpy as np

    from harness.benchmarks import shapes as S

    for index in range(6):
        doc = S.make_doc(0, "test", index)
        cells = S.make_scene(S.doc_rng(0, "test", index))
        image = S.render(cells)
        for cell, c in enumerate(cells):
            alone = np.asarray(S.render([c if k == cell else {"kind": "empty"} for k in range(16)]))
            ref = (alone != 255).any(-1).astype(np.float32)
            got = S.object_mask(image, cell)
            assert np.array_equal(got, ref), (index, cell)
            assert (got.sum() > 0) == (c["kind"] != "empty")
        assert doc["image"] is not None


def one_object_image(cell=6, box=(14, 18, 30, 28)):
    """A white 192 px image with one black rectangle inside `cell`: rows box[0]..box[2]-1 and columns
    box[1]..box[3]-1 from the cell's corner (by default 16 x 10 px across the middle of the cell, so on
    the tiny model's 8x8 grid of 24 px patches it spans four patches: 60, 40, 36 and 24 of its 160 px)."""
    from PIL import Image, ImageDraw

    r, c = divmod(cell, 4)
    img = Image.new("RGB", (192, 192), (255, 255, 255))
    y0, x0 = r * 48, c * 48
    ImageDraw.Draw(img).rectangle((x0 + box[1], y0 + box[0], x0 + box[3] - 1, y0 + box[2] - 1), fill=(0, 0, 0))
    return img


def ranked_patches(mask, side):
    """The object's patches by their pixel share (plain reference), largest first."""
    shares = plain_patch_shares(mask.tolist(), side)
    return sorted(shares.items(), key=lambda kv: -kv[1])


def test_keeping_only_the_objects_main_patch_scores_its_pixel_share():
    """Keeping only the patch holding most of the object's pixels gives that patch's pixel share (the
    plain per-pixel reference: 60/160 on the tiny model's grid), not the cell's equal-patch share."""
    from harness.benchmarks.shapes import object_mask

    model, proc = tiny()
    ad = get_adapter(model)
    mask = object_mask(one_object_image(), 6)
    side = math.isqrt(ad.visual_tokens_per_image)
    (top, share), *rest = ranked_patches(mask, side)
    assert len(rest) >= 1 and share < 1
    LR.install(model, ad, KeepPatches(0, [{top}], True))
    inp = batch(proc, [question(6)])
    with torch.no_grad():
        model(**inp)
    (got,) = R.layer_recall(model, ad, inp["input_ids"], [question(6)], [mask])
    assert got == pytest.approx([share] * ad.num_llm_layers)
    cw = R.cell_patch_weights(6, side)
    (cell_based,) = R.layer_recall(model, ad, inp["input_ids"], [question(6)])
    assert cell_based == pytest.approx([cw.get(top, 0.0) / sum(cw.values())] * ad.num_llm_layers)
    assert cell_based[0] != pytest.approx(share)


@pytest.mark.parametrize("name,want", [("none", 1.0), ("blind", 0.0)])
def test_keep_everything_gives_one_and_blind_zero(name, want):
    from harness.benchmarks.shapes import object_mask

    model, proc = S_model()
    ad = get_adapter(model)
    methods.build(name, {}).apply(model, ad)
    R.track(model, True)
    inp = batch(proc, [question(6)])
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=1, do_sample=False)
    got = R.layer_recall(model, ad, inp["input_ids"], [question(6)], [object_mask(one_object_image(), 6)])
    assert got == [[want] * ad.num_llm_layers]


class MergeOnce(LR.ReductionPlan):
    """Hand-built merge after layer 1's attention: visual ordinal `a` merged into `b` with weight 1 (the
    pair averaged), logged as FiCoCo-L logs its merges; `a` is dropped."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def merges_at(self, layer):
        return layer == 1

    def after_attention(self, view, qk):
        if view.layer != 1:
            return None
        visual = view.visual
        nv = int(visual[0].sum())
        targets = [k for k in range(nv) if k != self.a]
        alpha = torch.zeros(1, 1, nv - 1)
        alpha[0, 0, targets.index(self.b)] = 1.0
        view.state.merges[1] = (torch.tensor([[self.a]]), torch.tensor([targets]), alpha)
        pos = visual[0].nonzero().squeeze(1)
        keep = torch.tensor([[j for j in range(visual.shape[1]) if j != int(pos[self.a])]])
        return view.hidden, keep


def test_hand_built_merge_counts_by_the_objects_share():
    """Merging the object's main patch a into its second patch b with weight 1 leaves b holding half of
    each: from layer 2 on the recall is 1 - (w_a + w_b) / 2 (w: the plain per-pixel shares); layers 0-1
    come before the merge and are not counted."""
    from harness.benchmarks.shapes import object_mask

    model, proc = tiny()
    ad = get_adapter(model)
    side = math.isqrt(ad.visual_tokens_per_image)
    mask = object_mask(one_object_image(), 6)
    (a, wa), (b, wb), *_ = ranked_patches(mask, side)
    LR.install(model, ad, MergeOnce(a, b))
    inp = batch(proc, [question(6)])
    with torch.no_grad():
        model(**inp)
    (got,) = R.layer_recall(model, ad, inp["input_ids"], [question(6)], [mask])
    want = 1 - (wa + wb) / 2
    assert 0 < want < 1
    assert got[:2] == [None, None] and got[2:] == pytest.approx([want] * (ad.num_llm_layers - 2))


def test_partial_rows_keep_the_uncounted_layers(tmp_path):
    """A resumed cell reads back the per-layer recall with its None layers (before the method acts)."""
    from harness.results import ResultsStore

    store = ResultsStore(tmp_path)
    store.append_partial("a" * 16, [("t", "test", 3, "red", False, [None, None, 0.5, 0.25])], code="c")
    (row,) = store.load_partial("a" * 16, "c").values()
    assert row.recall == [None, None, 0.5, 0.25]
