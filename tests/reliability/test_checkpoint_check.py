"""The one checkpoint check (issue 32, points 1-5 and 9): a checkpoint whose files disagree with each other is
bad input — one line naming the file and what disagrees, exit 2, nothing written — for a single run before
"Loading weights" and for a sweep before its first cell. Every kind of damage is tried on every tiny family
(LLaVA, Qwen2-VL, LLaVA-OneVision), through `check_checkpoint` itself, then end to end through `vtbench`
and `vtbench -m`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli.main import run_one
from harness.models.loading import ModelLoadError

pytestmark = pytest.mark.bad_input


# ---- checkpoints of every family, and ways to damage them -------------------------------------------------
@pytest.fixture(scope="session")
def family_checkpoints(tiny_checkpoint, tmp_path_factory):
    from harness.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("family-ckpts")
    return {"llava": Path(tiny_checkpoint),
            "qwen2_vl": Path(save_tiny("qwen2_vl", root / "qwen2_vl")),
            "llava_onevision": Path(save_tiny("llava_onevision", root / "llava_onevision"))}


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _image_processor_file(ckpt: Path) -> Path:
    from harness.models.checkpoint import _image_processor_file

    return ckpt / _image_processor_file(ckpt)


def _ip(ckpt: Path, fn) -> None:
    f = _image_processor_file(ckpt)
    _edit(f, lambda d: fn(d.get("image_processor", d)))


def _more_layers(ckpt):
    _edit(ckpt / "config.json", lambda c: c["text_config"].update(
        num_hidden_layers=c["text_config"]["num_hidden_layers"] + 8,
        **({"layer_types": c["text_config"]["layer_types"] + c["text_config"]["layer_types"][:1] * 8}
           if "layer_types" in c["text_config"] else {})))


def _vocab(ckpt):
    _edit(ckpt / "config.json", lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] + 7))


def _processor_size(ckpt):
    """The processor makes images (or patches) the vision tower does not take."""
    cfg = json.loads((ckpt / "config.json").read_text())["vision_config"]
    if "spatial_merge_size" in cfg:  # Qwen2-VL: patches of another size
        _ip(ckpt, lambda d: d.update(patch_size=cfg["patch_size"] + 2))
    else:
        s = cfg["image_size"] + 32
        _ip(ckpt, lambda d: d.update(size={"height": s, "width": s} if "height" in json.dumps(d.get("size")) else
                                     {"shortest_edge": s}, crop_size={"height": s, "width": s}))


def _token_out_of_vocab(ckpt):
    _edit(ckpt / "config.json", lambda c: c.update(
        {k: c["text_config"]["vocab_size"] + 3 for k in ("image_token_index", "image_token_id") if k in c}))


def _token_other_id(ckpt):
    _edit(ckpt / "config.json", lambda c: c.update({k: 5 for k in ("image_token_index", "image_token_id") if k in c}))


def _template_file(ckpt) -> Path:
    return next(ckpt / n for n in ("chat_template.jinja", "chat_template.json") if (ckpt / n).is_file())


def _bad_template(ckpt):
    f = _template_file(ckpt)
    if f.suffix == ".jinja":
        f.write_text("{% for m in messages %}{{ m.content ")
    else:
        _edit(f, lambda d: d.update(chat_template="{% for m in messages %}{{ m.content "))


def _no_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()


def _truncate(name):
    def damage(ckpt):
        f = ckpt / name
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size * 2 // 3)])
    return damage


def _bad_generation_config(ckpt):
    _edit(ckpt / "generation_config.json", lambda g: g.update(max_new_tokens=-3))


#: damage -> (what it does to a copy of a good checkpoint, the file the error must name, words it must hold)
DAMAGES = {
    "config claims 8 more layers": (_more_layers, "model.safetensors", "does not match its config.json"),
    "weights of another vocabulary size": (_vocab, "model.safetensors", "shape disagrees"),
    "processor image size vs tower": (_processor_size, "<image processor>", "vision tower takes"),
    "image token outside the vocabulary": (_token_out_of_vocab, "config.json", "outside the vocabulary"),
    "image token is another id": (_token_other_id, "config.json", "image token"),
    "stored chat template does not compile": (_bad_template, "<template>", "does not compile"),
    "tokenizer missing": (_no_tokenizer, "tokenizer", "missing"),
    "tokenizer.json truncated": (_truncate("tokenizer.json"), "tokenizer.json", "not valid JSON"),
    "generation_config.json truncated": (_truncate("generation_config.json"), "generation_config.json", "not valid JSON"),
    "generation_config.json invalid": (_bad_generation_config, "generation_config.json", "not a valid generation config"),
    "config.json truncated": (_truncate("config.json"), "config.json", "not valid JSON"),
}


#: end to end (`vtbench`, `vtbench -m`), one damage of each kind of file in the fast tier, all of them under `slow`
#: (each kind is checked on every family through `check_checkpoint` above)
FAST = {"config claims 8 more layers", "processor image size vs tower", "stored chat template does not compile",
        "tokenizer.json truncated"}
END_TO_END = [d if d in FAST else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGES]


def _damaged(src: Path, tmp_path: Path, damage: str) -> tuple[Path, str]:
    ckpt = tmp_path / ("bad-" + damage.replace(" ", "-").replace(".", "_"))
    shutil.copytree(src, ckpt)
    fn, file, _ = DAMAGES[damage]
    file = {"<image processor>": lambda: _image_processor_file(src).name,
            "<template>": lambda: _template_file(src).name}.get(file, lambda: file)()
    fn(ckpt)
    return ckpt, file


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damage_is_named_in_one_line(family_checkpoints, tmp_path, family, damage):
    from harness.models.checkpoint import check_checkpoint

    check_checkpoint({"pretrained": str(family_checkpoints[family])})  # the good one passes
    ckpt, file = _damaged(family_checkpoints[family], tmp_path, damage)
    with pytest.raises(ModelLoadError) as e:
        check_checkpoint({"pretrained": str(ckpt)})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.pretrained={ckpt}: "), msg
    assert file in msg and DAMAGES[damage][2] in msg, msg


def test_a_shape_mismatch_names_the_tensors_and_both_shapes(family_checkpoints, tmp_path):
    """Point 4: the check, and the loader if reached, name the tensors with both shapes (never transformers'
    "look at the above report" with the report hidden)."""
    from harness.models.checkpoint import check_checkpoint
    from harness.models.loading import load_model

    ckpt, _ = _damaged(family_checkpoints["llava"], tmp_path, "weights of another vocabulary size")
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    for call in (lambda: check_checkpoint({"pretrained": str(ckpt)}),
                 lambda: load_model({"pretrained": str(ckpt), "dtype": "float32", "attn_implementation": "sdpa"})):
        with pytest.raises(ModelLoadError) as e:
            call()
        msg = str(e.value)
        assert "embed_tokens.weight" in msg and f"[{vocab - 7}, " in msg and f"[{vocab}, " in msg, msg
        assert "above report" not in msg and "\n" not in msg


@pytest.fixture
def no_model_load(monkeypatch):
    import harness.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded for a bad checkpoint")

    monkeypatch.setattr(loading, "load_model", boom)


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("vtbench:")]


def _args(data_dir, tmp_path):
    return [f"data_dir={data_dir}", f"store.dir={tmp_path / 'store'}", "logger=none", "run.limit=2",
            "run.efficiency.enabled=false"]


@pytest.mark.parametrize("damage", END_TO_END)
def test_single_run_refuses_before_loading_weights(family_checkpoints, data_dir, tmp_path, capsys, no_model_load,
                                                   damage):
    ckpt, file = _damaged(family_checkpoints["llava"], tmp_path, damage)
    rc = run_one(_args(data_dir, tmp_path) + [f"model.pretrained={ckpt}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(_lines(err)) == 1 and file in _lines(err)[0], err[-2000:]
    assert "Traceback" not in err and "Loading weights" not in err
    assert not (tmp_path / "store").exists()  # the store is not even created


@pytest.mark.parametrize("damage", END_TO_END)
def test_sweep_refuses_a_bad_checkpoint_before_its_first_cell(family_checkpoints, data_dir, tmp_path, capsys,
                                                              monkeypatch, damage):
    """`vtbench -m model.pretrained=<good>,<bad>`: exit 2 before any cell (the good one first) runs."""
    import harness.runner as runner
    from harness.sweep import run_multirun

    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    ckpt, file = _damaged(family_checkpoints["llava"], tmp_path, damage)
    rc = run_multirun(_args(data_dir, tmp_path) + [f"model.pretrained={family_checkpoints['llava']},{ckpt}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(_lines(err)) == 1 and file in _lines(err)[0] and str(ckpt) in _lines(err)[0], err[-2000:]
    assert not (tmp_path / "store").exists()


def test_sweep_refuses_renumbered_positions_on_mrope_before_any_cell(family_checkpoints, data_dir, tmp_path, capsys,
                                                                    monkeypatch):
    import harness.runner as runner
    from harness.sweep import run_multirun

    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    rc = run_multirun(_args(data_dir, tmp_path) + ["model=tiny_qwen2_vl", f"model.pretrained={family_checkpoints['qwen2_vl']}",
                                                   "method=fastv", "method.params.positions=keep,renumber"])
    err = capsys.readouterr().err
    assert rc == 2 and len(_lines(err)) == 1, err[-2000:]
    # led by the cell it was found in (harness.sweep.sweep_error_line), then the key and value
    assert _lines(err)[0].startswith("vtbench: error: [method.params.positions=renumber] "
                                     "method.params.positions=renumber:") and "M-RoPE" in err


def test_every_method_with_positions_refuses_renumber_on_every_mrope_family_at_validation():
    """The class: validation (meta device), not `apply`, refuses `positions=renumber` on M-RoPE, for every
    registered method that has a `positions` parameter."""
    import dataclasses

    import methods
    from harness.models.adapter import get_adapter
    from harness.models.loading import meta_model
    from harness.models.tiny import build_tiny
    names = [n for n in methods.available() if "positions" in {f.name for f in dataclasses.fields(methods.get(n))}]
    assert {"fastv", "random", "ficoco_l"} <= set(names), names
    ACTING = {n: methods.get(n).example for n in names}  # the conformance contract: parameters that reduce
    assert all(isinstance(p, dict) for p in ACTING.values()), ACTING
    for family in ("qwen2_vl", "qwen2_5_vl"):
        model, _ = build_tiny(family)
        adapter = get_adapter(meta_model(model.config))
        assert adapter.position_streams > 1
        for name in names:
            m = methods.build(name, dict(ACTING[name], positions="renumber"))
            with pytest.raises(methods.MethodError, match="M-RoPE") as e:
                m.validate(adapter)
            assert "\n" not in str(e.value)
            methods.build(name, dict(ACTING[name], positions="keep")).validate(adapter)


# ---- model.pretrained values that are neither a folder nor a hub id (point 5) -------------------------------
@pytest.mark.parametrize("value", ["/tmp/" + "x" * 300, "x" * 300, "org/" + "m" * 300, "./" + "d" * 300 + "/ckpt"])
def test_a_very_long_pretrained_is_one_line(value, data_dir, tmp_path, capsys, no_model_load):
    rc = run_one(_args(data_dir, tmp_path) + [f"model.pretrained={value}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(_lines(err)) == 1 and "Traceback" not in err, err[-2000:]
    assert _lines(err)[0].startswith("vtbench: error: model.pretrained=") and len(_lines(err)[0]) < 400


# ---- the tiny family checkpoints are under the project, never the current directory (point 9) ---------------
def test_model_configs_never_resolve_against_the_current_directory(tmp_path, monkeypatch):
    from harness.config import CONF_DIR
    from harness.models.loading import PROJECT, ModelLoadError, resolve_pretrained
    from omegaconf import OmegaConf

    fake = tmp_path / "runs" / "tiny" / "qwen2_vl"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for f in sorted((CONF_DIR / "model").glob("*.yaml")):
        pretrained = str(OmegaConf.load(f).pretrained)
        assert not pretrained.startswith((".", "/", "~")), f"{f.name}: {pretrained}"
        if pretrained.startswith("project:"):
            try:
                path, _ = resolve_pretrained(pretrained)
            except ModelLoadError as e:  # not built here (`make tiny-families`): named under the project
                assert str(PROJECT) in str(e)
            else:
                assert Path(path).is_relative_to(PROJECT) and not Path(path).is_relative_to(tmp_path)
