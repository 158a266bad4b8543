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
    assert size < 40 * 1024 * 1024, size
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md",
                 "train_log.csv"):
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
    assert full >= 0.65, full
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
    objectives at visual positions, routing, gather and read-out supervision) run end to end."""
    from harness.tiny_model import train

    train.main(["--smoke", "--out", str(tmp_path), "--no-bar", "--proj-init2", "standardize",
                "--dense-weight2", "1.0", "--dense-layer2", "1", "--row-layer2", "1", "--col-layer2", "1",
                "--route-weight2", "1.0", "--route-layer2", "1", "--gather-layer2", "0", "--readout-layer2", "1",
                "--count-head2", "1", "--dense-pos-letter2"])
    assert (tmp_path / "model.safetensors").exists()


def test_cell_words_and_projector_init():
    from harness.tiny_model import train

    shape = {"kind": "shape", "shape": "star", "colour": "red"}
    letter = {"kind": "letter", "letter": "K"}
    assert train.cell_words(shape, 1, 2, "words") == ["red", "star"]
    assert train.cell_words(letter, 1, 2, "words") == ["k"]
    assert train.cell_words(letter, 1, 2, "row") == ["2"] and train.cell_words(letter, 1, 2, "col") == ["3"]
    assert train.cell_words(letter, 1, 2, "col", with_letter=True) == ["k", "3"]
    assert train.cell_words(shape, 1, 2, "row") == [] and train.cell_words({"kind": "empty"}, 0, 0, "words") == []

    model, _ = train.build(train.CONFIGS["smoke"], seed=0)
    feats = 40.0 + 3.0 * torch.randn(2, 144, model.config.vision_config.hidden_size)  # a large common component
    train.init_projector(model, feats, seed=0)
    with torch.no_grad():
        out = model.model.multi_modal_projector(feats)
    emb_std = float(model.model.language_model.get_input_embeddings().weight.std())
    rms = float(out.pow(2).mean().sqrt())
    assert 0.5 * emb_std < rms < 2.0 * emb_std, (rms, emb_std)
