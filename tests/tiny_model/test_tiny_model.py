"""Tests of the embedded tiny LLaVA (`harness/assets/tiny-llava`) and its training script."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness.benchmarks import shapes as S

ASSET = Path(__file__).resolve().parents[2] / "harness" / "assets" / "tiny-llava"
WEIGHTS = ASSET / "model.safetensors"
needs_weights = pytest.mark.skipif(
    not WEIGHTS.exists(),
    reason=f"trained weights not committed yet ({WEIGHTS} missing); run `make tiny-model`",
)


@pytest.fixture(scope="module")
def tiny():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from harness.tiny_model.evaluate import load

    return load(ASSET)  # on the one torch thread of every test (tests/conftest.py)


@needs_weights
def test_folder_small_and_complete():
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size <= 20 * 1000 * 1000, size  # the bound: at most 20 MB
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md",
                 "train_log.csv", "properties.json", "scores.json"):
        assert (ASSET / name).exists(), name


@needs_weights
def test_architecture(tiny):
    model, processor = tiny
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    vc = cfg.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    assert n_img >= 144
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.text_config.model_type == "llama"
    assert vc.model_type == "clip_vision_model"
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    doc = S.generate("test", 1)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == f"USER: <image>\n{doc['question']} ASSISTANT:"
    inputs = processor(images=doc["image"], text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == n_img


@pytest.mark.slow
@needs_weights
def test_answers_test_questions_and_needs_the_image(tiny):
    """The committed weights answer well above the answer prior, not without the image, and lose
    clearly when only a random 10 % of the visual tokens is kept (first 100 test questions; the
    full-split scores are in the model card)."""
    import numpy as np
    from PIL import Image

    from harness.tiny_model.evaluate import answer, answer_dropped

    model, processor = tiny
    docs = S.generate("test", 100)
    full = np.mean([S.score(answer(model, processor, d["image"], d["question"]), d["answer"]) for d in docs])
    gray = Image.new("RGB", (S.IMAGE_SIZE, S.IMAGE_SIZE), (128, 128, 128))
    blank = np.mean([S.score(answer(model, processor, gray, d["question"]), d["answer"]) for d in docs])
    rng = np.random.default_rng(0)
    r10 = np.mean([S.score(answer_dropped(model, processor, d["image"], d["question"], 0.1, rng), d["answer"])
                   for d in docs])
    prior = S.prior_baseline(docs)
    assert full >= 0.8, full
    assert blank <= prior + 0.10, (blank, prior)
    assert r10 <= full - 0.15, (r10, full)


@needs_weights
def test_random_drop_path_runs(tiny):
    import numpy as np

    from harness.tiny_model.evaluate import answer_dropped

    model, processor = tiny
    d = S.generate("test", 1)[0]
    out = answer_dropped(model, processor, d["image"], d["question"], 0.1, np.random.default_rng(0))
    assert isinstance(out, str)
    # keeping everything reproduces the normal path
    from harness.tiny_model.evaluate import answer

    full = answer_dropped(model, processor, d["image"], d["question"], 1.0, np.random.default_rng(0))
    assert S.normalize_answer(full) == S.normalize_answer(answer(model, processor, d["image"], d["question"]))


def test_training_smoke(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from harness.tiny_model import train

    info = train.main(["--smoke", "--out", str(tmp_path), "--no-bar"])
    assert (tmp_path / "model.safetensors").exists()
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert rows[0] == "stage,step,wall_s,loss,val_acc" and len(rows) >= 5
    assert json.loads((tmp_path / "train_info.json").read_text())["seed"] == info["seed"]
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path))
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert model.config.vision_feature_layer == -2
    d = S.generate("val", 1)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["question"]}]}]
    inputs = processor(images=d["image"], text=processor.apply_chat_template(msgs, add_generation_prompt=True),
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] >= inputs["input_ids"].shape[1]


def test_training_smoke_deterministic(tmp_path):
    from safetensors.torch import load_file

    from harness.tiny_model import train

    train.main(["--smoke", "--out", str(tmp_path / "a"), "--no-bar"])
    train.main(["--smoke", "--out", str(tmp_path / "b"), "--no-bar"])
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_smoke_with_the_recipe_objectives(tmp_path):
    """The committed recipe's stage-2 objectives (standardised projector init, dense word / row / column
    objectives at every covered visual position, read-out supervision) run end to end on varied canvases."""
    from harness.tiny_model import train

    train.main(["--smoke", "--out", str(tmp_path), "--no-bar", "--proj-init2", "standardize",
                "--dense-weight2", "1.0", "--dense-layer2", "1", "--row-layer2", "1", "--col-layer2", "1",
                "--readout-layer2", "0", "--code-layer2", "1", "--curriculum2", "2",
                "--ground-weight2", "1.0", "--ground-layer2", "1", "--questions2", "5"])
    assert (tmp_path / "model.safetensors").exists()


def test_code_targets_and_curriculum():
    from harness.tiny_model import train

    assert train.code_targets("colour", "What colour is the shape in row 2, column 3?") == {"row": 1, "col": 2}
    assert train.code_targets("position", "Which row is the letter K in?") == {"letter": S.LETTERS.index("K") + 1}
    assert train.code_targets("count", "How many red shapes are there?") == {"colour": S.COLOUR_NAMES.index("red") + 1}
    assert train.code_targets("count", "How many crosses are there?") == {"shape": S.SHAPES.index("cross") + 1}
    assert train.curriculum_p_empty(0, 100) == pytest.approx(0.9)
    assert train.curriculum_p_empty(100, 100) == S.P_EMPTY == train.curriculum_p_empty(5, 0)
    # the shared heads read the visual tokens' labels and the questions' targets in the same classes
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(8, n) for k, n in train.CODE_HEADS.items()})
    lab = torch.zeros(4, 7, dtype=torch.long)
    lab[:, 4], lab[:, 5], lab[1, 1], lab[2, 3] = torch.tensor([0, 1, 2, 3]), 1, 2, 5
    loss = train.code_loss(heads, torch.randn(1, 4, 8), [lab], torch.randn(2, 8), [{"row": 1, "col": 2}, {"letter": 5}])
    assert torch.isfinite(loss) and loss > 0


def test_grounding_targets_weigh_objects_equally_and_the_sink_as_one_more():
    from harness.tiny_model import train

    lab = torch.full((10, 7), 0, dtype=torch.long)
    lab[:, 6] = torch.tensor([-1, 3, 3, 3, 5, 5, -1, 7, -1, -1])
    one = train.grounding_targets(lab, [3], False, img_start=4)
    assert one == pytest.approx({5: 1 / 3, 6: 1 / 3, 7: 1 / 3})
    cnt = train.grounding_targets(lab, [3, 5, 7], True, img_start=4)
    assert cnt[0] == pytest.approx(0.25) and sum(cnt.values()) == pytest.approx(1.0)
    assert sum(cnt[4 + i] for i in (4, 5)) == pytest.approx(0.25) and cnt[4 + 7] == pytest.approx(0.25)
    assert train.grounding_targets(lab, [], True, 4) == {0: 1.0}  # a count of zero: all on the sink
    assert train.grounding_targets(lab, [9], False, 4) == {}  # an object covering no token: no target


def test_canvases_vary_and_include_the_benchmark():
    from harness.tiny_model import train

    for stage in ("vision", "llm"):
        got = [train.canvas(0, stage, s) for s in range(1000)]
        assert got == [train.canvas(0, stage, s) for s in range(1000)]  # deterministic
        share = sum(g == (S.CELL, S.CELL) for g in got) / len(got)
        assert abs(share - train.P_BENCH_CANVAS[stage]) < 0.05, (stage, share)
    assert len({g[0] * 10 + g[1] for g in got}) >= 15 and any(g[0] != g[1] for g in got)
    assert all(w in train.CELL_SIZES and h in train.CELL_SIZES for w, h in got)


@pytest.mark.parametrize("cw,ch", [(48, 48), (32, 64), (56, 40)])
def test_patch_labels_name_every_covered_patch(cw, ch):
    import numpy as np

    from harness.tiny_model import train

    d = S.generate("val", 3, with_cells=True)[2]
    img = S.render(d["cells"], cw, ch)
    lab = train.patch_labels(d["cells"], img, cw, ch).numpy()
    gw, gh = img.size[0] // 16, img.size[1] // 16
    assert lab.shape == (gw * gh, 7)
    a = (np.asarray(img) != 255).any(-1)
    for n in range(gw * gh):
        py, px = divmod(n, gw)
        assert lab[n, 4] == min((py * 16 + 8) // ch, 3) and lab[n, 5] == min((px * 16 + 8) // cw, 3)
        owner = lab[n, 6]
        if owner < 0:
            assert lab[n, 0] == 0
            continue
        c = d["cells"][owner]
        r, col = divmod(int(owner), S.GRID)
        block = a[py * 16:(py + 1) * 16, px * 16:(px + 1) * 16]
        ys, xs = np.nonzero(block)
        ys, xs = ys + py * 16, xs + px * 16
        assert ((ys // ch == r) & (xs // cw == col)).sum() >= train.MIN_PIXELS
        assert lab[n, 0] == train.KIND_IDS[c["kind"]]
        if c["kind"] == "shape":
            assert S.COLOUR_NAMES[lab[n, 1] - 1] == c["colour"] and S.SHAPES[lab[n, 2] - 1] == c["shape"]
        else:
            assert S.LETTERS[lab[n, 3] - 1] == c["letter"]
    covered = {int(o) for o in lab[:, 6] if o >= 0}
    objects = {k for k, c in enumerate(d["cells"]) if c["kind"] != "empty"}
    assert covered <= objects
    if min(cw, ch) >= S.CELL:  # on the benchmark canvas (and larger) every object covers a patch
        assert covered == objects
    if (cw, ch) == (48, 48):  # the benchmark canvas: objects span several patches
        per = [int((lab[:, 6] == k).sum()) for k in covered]
        assert sum(per) / len(per) >= 3


def test_prompt_codec_any_canvas_and_tower_features():
    from harness.tiny_model import train

    model, processor = train.build(train.CONFIGS["smoke"], seed=0)
    codec = train.PromptCodec(processor)
    q = "What shape is in row 2, column 3?"
    for n in (144, 80, 256):
        ids = processor.tokenizer(train.prompt_text(processor, q).replace("<image>", "<image>" * n))["input_ids"]
        assert codec.prefix(n) + codec.suffix(q) == ids
    d = S.generate("val", 1, with_cells=True)[0]
    f = train.tower_features(model, train.pixels([S.render(d["cells"], 32, 64)]))
    assert f.shape[:2] == (1, 8 * 16)
    f192 = train.tower_features(model, train.pixels([d["image"]]))
    with torch.no_grad():
        ref = model.model.get_image_features(
            pixel_values=processor(images=d["image"], text="<image>", return_tensors="pt")["pixel_values"]).pooler_output
        got = model.model.multi_modal_projector(f192)
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in ref])
    assert torch.allclose(got[0], ref, atol=1e-5)


def test_cell_words_and_projector_init():
    from harness.tiny_model import train

    shape = {"kind": "shape", "shape": "star", "colour": "red"}
    letter = {"kind": "letter", "letter": "K"}
    assert train.cell_words(shape, 1, 2, "words") == ["red", "star"]
    assert train.cell_words(letter, 1, 2, "words") == ["k"]
    assert train.cell_words(letter, 1, 2, "row") == ["2"] and train.cell_words(letter, 1, 2, "col") == ["3"]
    assert train.cell_words(shape, 1, 2, "row") == [] and train.cell_words({"kind": "empty"}, 0, 0, "words") == []

    model, _ = train.build(train.CONFIGS["smoke"], seed=0)
    feats = 40.0 + 3.0 * torch.randn(2, 144, model.config.vision_config.hidden_size)  # a large common component
    train.init_projector(model, feats, seed=0)
    with torch.no_grad():
        out = model.model.multi_modal_projector(feats)
    emb_std = float(model.model.language_model.get_input_embeddings().weight.std())
    rms = float(out.pow(2).mean().sqrt())
    assert 0.5 * emb_std < rms < 2.0 * emb_std, (rms, emb_std)
