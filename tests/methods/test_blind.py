"""`blind` (methods/blind.py) on every family: equals the unpatched model run on the prompt with its image
tokens removed by a plain list filter; the vision tower never runs; 0 visual tokens reach the LLM on every
sample; counted FLOPs == analytic (vision and projector 0); cached == uncached; padded batch == single prompts;
`generate` returns the caller's prompt; no budget, no parameters (one line, exit 2, before the model loads)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import methods
from harness.efficiency import flops as F
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods._shared.context import get_context
from methods.base import MethodError
from tests.efficiency.helpers import image
from tests.methods.helpers import greedy_uncached

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
fam = pytest.mark.parametrize("family", FAMILIES)
#: two images of different sizes per prompt (Qwen: 6 and 4 visual tokens; NeXT / OneVision: different crops)
SIZES = [(84, 56), (64, 64)]
TEXTS = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]


def model_and_processor(family):
    return build_tiny(family, gqa=True, vision_layers=3)


def prompt(proc, text):
    content = [{"type": "image"}] * len(SIZES) + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(proc, texts, first=0):
    imgs = [image(7 * (b + first) + i, s) for b in range(len(texts)) for i, s in enumerate(SIZES)]
    return proc(images=imgs, text=[prompt(proc, t) for t in texts], return_tensors="pt", padding=len(texts) > 1)


def applied(family):
    model, proc = model_and_processor(family)
    methods.build("blind", {}).apply(model, get_adapter(model))
    return model, proc


@fam
def test_equals_the_unpatched_model_on_the_prompt_without_image_tokens(family, capsys):
    model, proc = applied(family)
    ref_model, _ = model_and_processor(family)  # same seed: same weights, unpatched
    inp = batch(proc, TEXTS[:1])
    img = model.config.image_token_id
    plain = [t for t in inp["input_ids"][0].tolist() if t != img]  # the plain reference: a list filter
    assert len(plain) < inp["input_ids"].shape[1]
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([plain]), attention_mask=torch.ones(1, len(plain), dtype=torch.long)
                        ).logits[:, -1]
        out = model(**inp).logits[:, -1]
    delta = float((out - ref).abs().max())
    with capsys.disabled():
        print(f"\nblind {family}: max |dlogit| vs plain reference = {delta:.2e}")
    assert delta < 1e-5


@fam
def test_no_visual_token_reaches_the_llm_and_the_tower_never_runs(family):
    model, proc = applied(family)
    a = get_adapter(model)
    calls = []
    h1 = a.vision_tower.register_forward_hook(lambda *x: calls.append("vision"))
    h2 = a.projector.register_forward_hook(lambda *x: calls.append("projector"))
    inp = batch(proc, TEXTS)
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    h1.remove(), h2.remove()
    assert calls == []
    P = inp["input_ids"].shape[1]
    assert torch.equal(out[:, :P], inp["input_ids"])  # the caller's prompt, then the new tokens
    ctx = get_context(model)
    with torch.no_grad():
        model(**inp)
    assert ctx.visual_tokens_final == 0 and set(ctx.visual_tokens_per_layer) == {0}
    assert ctx.prompt_visual.tolist() == (inp["input_ids"] == model.config.image_token_id).sum(1).tolist()


@fam
def test_counted_flops_equal_analytic(family):
    model, proc = applied(family)
    m = methods.build("blind", {})
    inp = batch(proc, TEXTS[:1])
    (layout,) = F.layouts_from_inputs(model, inp)
    counted = F.count_prefill(model, inp)
    assert counted.flops == F.analytic_prefill(model.config, layout, m)
    assert counted.flops["vision"] == counted.flops["projector"] == 0
    assert m.visual_tokens_kept(layout) == 0


@fam
def test_cached_greedy_equals_uncached(family):
    model, proc = applied(family)
    inp = batch(proc, TEXTS[:1])
    with torch.no_grad():
        cached = model.generate(**inp, max_new_tokens=5, do_sample=False)[:, inp["input_ids"].shape[1]:]
    assert torch.equal(cached, greedy_uncached(model, inp, 5))


@fam
def test_padded_batch_equals_single_prompts(family):
    model, proc = applied(family)
    inp = batch(proc, TEXTS)
    assert not bool(inp["attention_mask"].all())
    with torch.no_grad():
        both = model.generate(**inp, max_new_tokens=4, do_sample=False)[:, inp["input_ids"].shape[1]:]
        logits = model(**inp).logits[:, -1]
    for b, t in enumerate(TEXTS):
        one = batch(proc, [t], first=b)
        with torch.no_grad():
            single = model.generate(**one, max_new_tokens=4, do_sample=False)[:, one["input_ids"].shape[1]:]
            l1 = model(**one).logits[:, -1]
        assert torch.equal(both[b], single[0]), (family, b)
        torch.testing.assert_close(logits[b], l1[0], rtol=1e-4, atol=1e-4)


def test_loglikelihood_equals_generation_through_the_wrapper():
    from tests.methods.helpers import assert_loglikelihood_equals_generation

    model, proc = applied("llava")
    assert_loglikelihood_equals_generation(model, proc, [image(0, (64, 64))])


def test_meta_analytic_on_the_full_size_model():
    """Full-size LLaVA-1.5-7B: no vision, no projector, the LLM over the text only (what vtbench-flops prints)."""
    from omegaconf import OmegaConf

    from harness.models.loading import config_from_cfg

    config = config_from_cfg(OmegaConf.load(ROOT / "conf/model/llava15_7b.yaml"))
    layout = F.synthetic_layout(config)
    blind = F.analytic_prefill(config, layout, methods.build("blind", {}))
    text_only = F.analytic_prefill(config, layout.with_visual(0))
    assert blind == dict(text_only, vision=0, projector=0)


def test_config_file_builds():
    cfg = yaml.safe_load((ROOT / "conf/method/blind.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert m.params() == {} and methods.get("blind").noop is None


@pytest.mark.bad_input
@pytest.mark.parametrize("params", [{"keep": 1}, {"tokens": float("nan")}])
def test_has_no_parameters(params):
    with pytest.raises(MethodError, match="has no parameter") as e:
        methods.build("blind", params)
    assert "\n" not in str(e.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, message", [
    (["budget.kind=tokens", "budget.value=0.33"], "method 'blind' takes no budget (it keeps no visual token whatever the budget); drop budget.kind"),
    (["method.params.keep=3"], "unknown config key 'method.params.keep'"),
])
def test_cli_refuses_before_the_model_loads(extra, message, tiny_checkpoint, data_dir, tmp_path, capsys,
                                            monkeypatch):
    import harness.models.loading as loading
    from harness.cli.main import run_one

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = run_one([f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={tmp_path / 's'}",
                  "logger=none", "run.limit=3", "method=blind"] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vtbench:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "s").exists() or not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


def test_asked_cell_recall_is_zero():
    from harness.recall import layer_recall, track

    model, proc = build_tiny("llava")
    methods.build("blind", {}).apply(model, get_adapter(model))
    track(model, True)
    q = "What colour is the shape in row 2, column 3?"
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                    add_generation_prompt=True)
    inputs = proc(images=image(0, (64, 64)), text=text, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert layer_recall(model, get_adapter(model), inputs["input_ids"], [q]) == [[0.0] * 4]


def test_meta_countable_flag_is_true():
    """blind reads the image tokens' positions from input_ids values: a meta forward cannot run (so
    `vtbench-flops` gives its analytic numbers without trying), as `meta_countable=False` says."""
    from omegaconf import OmegaConf

    from harness.models.loading import config_from_cfg, meta_model

    config = config_from_cfg(OmegaConf.load(ROOT / "conf/model/llava15_7b.yaml"))
    meta = meta_model(config)
    methods.build("blind", {}).apply(meta, get_adapter(meta))
    assert methods.get("blind").meta_countable is False
    with pytest.raises(RuntimeError, match="meta"):
        F.count_prefill(meta, F.synthetic_inputs(config))
