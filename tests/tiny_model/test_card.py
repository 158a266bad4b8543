"""The tiny model's property script (`harness.tiny_model.card`, `make tiny-model-card`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.benchmarks import shapes as S


@pytest.fixture(scope="module")
def smoke():
    from harness.tiny_model import train

    model, processor = train.build(train.CONFIGS["smoke"], seed=0)
    return model.eval(), processor


def _generate(model, processor, doc, max_new=3):
    from harness.tiny_model.evaluate import prompt

    inputs = processor(images=doc["image"], text=prompt(processor, doc["question"]), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_prober_on_all_tokens_is_the_model_itself(smoke):
    """All visual tokens in order -- renumbered or at their own positions -- answer exactly as `generate`;
    a permutation or a subset really changes what the decoder sees."""
    from harness.tiny_model.card import Prober

    model, processor = smoke
    docs = S.generate("val", 4)
    pr = Prober(model, processor)
    encs = pr.encode(docs, batch=3)
    for d, e in zip(docs, encs):
        ref = _generate(model, processor, d)
        assert pr.answer(e) == ref
        assert pr.answer(e, list(range(e[1].shape[0])), renumber=False) == ref
    # the logits of a subset at kept positions differ from the same subset renumbered (positions reach RoPE)
    before, feats, after = encs[0]
    keep = torch.arange(0, feats.shape[0], 3)
    nb = len(before)
    x = torch.cat([pr.emb(before), feats[keep], pr.emb(after)])[None]
    ren = torch.arange(x.shape[1])[None]
    kept = torch.cat([torch.arange(nb), nb + keep, nb + feats.shape[0] + torch.arange(len(after))])[None]
    with torch.no_grad():
        a = model(inputs_embeds=x, position_ids=ren).logits[0, -1]
        b = model(inputs_embeds=x, position_ids=kept).logits[0, -1]
    assert not torch.allclose(a, b)


def test_object_patches_and_colour_reading():
    from harness.tiny_model import card

    d = S.generate("val", 6, with_cells=True)
    for doc in d:
        for k, c in enumerate(doc["cells"]):
            w = card.object_patches(doc["image"], k)
            assert w.shape == (144,) and w.sum() == S.object_mask(doc["image"], k).sum()
            got = card._colour_of(doc["image"], k)
            if c["kind"] == "shape":
                assert S.COLOUR_NAMES[got] == c["colour"]
            elif c["kind"] == "empty":
                assert got is None


def test_colour_probe_separates_and_fails_on_noise():
    from harness.tiny_model.card import colour_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 3
    pairs = [(centres[c] + 0.3 * torch.randn(16, generator=g), c) for c in range(6) for _ in range(30)]
    assert colour_probe(pairs[::2], pairs[1::2]) > 0.95
    noise = [(torch.randn(16, generator=g), int(c)) for c in torch.randint(0, 6, (180,), generator=g)]
    assert colour_probe(noise[::2], noise[1::2]) < 0.5


def test_thresholds_hold_and_fail():
    from harness.tiny_model.model_card import PROPERTIES

    tests = {k: ok for k, _, _, ok in PROPERTIES}
    assert tests["random33_retention"](0.9) and not tests["random33_retention"](0.97)
    assert not tests["random33_retention"](0.8)
    assert tests["accuracy"](0.85) and not tests["accuracy"](0.84)
    assert tests["prior_over_accuracy"](0.3) and not tests["prior_over_accuracy"](0.6)
    assert {k for k, *_ in PROPERTIES} >= {"patches_per_object", "colour_probe_any_token", "drop_best_token_retention",
                                           "permute_renumber_retention", "random33_renumbered_vs_kept",
                                           "background_nn_cosine", "min_type_accuracy", "blank_over_accuracy"}


@pytest.mark.parametrize("argv,key", [(["--n", "0"], "--n"), (["--n", "nan"], "--n"),
                                      (["--model", "/nonexistent/x"], "--model"),
                                      (["--before", "no-such-revision-xyz", "--n", "2"], "--before")])
def test_bad_input_one_line_exit_2(argv, key, capsys, tmp_path):
    from harness.tiny_model import card

    try:
        rc = card.main(argv + ["--json", str(tmp_path / "out.json")])
    except SystemExit as e:  # argparse: a value of the wrong type
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and key in err[-1]
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_committed_model_card_numbers_rerun():
    """The committed properties.json comes from this script on the committed checkpoint: rerunning the
    measurement on the full test split gives the same numbers, and every property holds."""
    import json
    from pathlib import Path

    from harness.tiny_model import card

    asset = Path(card.DEFAULT_MODEL)
    stored = json.loads((asset / "properties.json").read_text())["after"]
    got = card.measure(asset, card.generator_of(asset), stored["n"], progress=lambda *_: None)
    for k, _, _, ok in card.PROPERTIES:
        assert got[k] == pytest.approx(stored[k], abs=1e-9), k
        assert ok(got[k]), (k, got[k])
