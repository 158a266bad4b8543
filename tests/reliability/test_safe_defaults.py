"""Safe defaults: no remote code unless a model config says so, safetensors only, nothing unpickled
from the store or the data, config values never evaluated as code."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from harness.config import CONF_DIR, compose_config, group_options

ROOT = Path(__file__).resolve().parents[2]


def test_trust_remote_code_is_off_in_every_model_config():
    for name in group_options("model"):
        raw = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
        assert raw.get("trust_remote_code") is False, name  # stated explicitly, and off
        assert compose_config([f"model={name}"]).model.trust_remote_code is False


def test_loader_passes_safe_flags(tiny_checkpoint, monkeypatch):
    import transformers

    from harness.models.loading import load_model

    seen = {}
    real_model = transformers.AutoModelForImageTextToText.from_pretrained
    real_proc = transformers.AutoProcessor.from_pretrained

    def model_fp(*a, **k):
        seen["model"] = k
        return real_model(*a, **k)

    def proc_fp(*a, **k):
        seen["processor"] = k
        return real_proc(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", proc_fp)
    load_model({"pretrained": tiny_checkpoint, "dtype": "float32", "attn_implementation": "sdpa"})
    assert seen["model"]["use_safetensors"] is True and seen["model"]["trust_remote_code"] is False
    assert seen["processor"]["trust_remote_code"] is False


@pytest.mark.bad_input
def test_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    """A checkpoint with only pytorch_model.bin (pickle) is refused by the pre-check and by the loader."""
    import torch
    from safetensors.torch import load_file

    from harness.models.checkpoint import check_available
    from harness.models.loading import ModelLoadError, load_model

    ckpt = tmp_path / "bin-only"
    shutil.copytree(tiny_checkpoint, ckpt)
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    cfg = {"pretrained": str(ckpt), "dtype": "float32", "attn_implementation": "sdpa"}
    with pytest.raises(ModelLoadError, match="no safetensors weights .*pytorch_model.bin"):
        check_available(cfg)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(cfg)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["__import__('os').system('touch PWNED')", "${eval:1+1}",
                                   "\"$(touch PWNED)\"", "${python:system}"])
def test_config_values_are_never_evaluated(value, tmp_path, monkeypatch, capsys):
    from harness.cli.main import run_one
    from harness.errors import bad_input_errors

    bad_input_errors()  # import what the command imports before leaving the project directory
    monkeypatch.chdir(tmp_path)
    rc = run_one([f"run.limit={value}", f"store.dir={tmp_path / 'store'}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vtbench: error:"), err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "store").exists()


def test_store_and_progress_are_plain_json(tmp_path):
    from harness.results import ResultsStore

    from tests.records import make_record

    store = ResultsStore(tmp_path)
    rec = make_record("none", (1.0,), metrics={"exact_match": 1.0, "other": float("nan")})
    k = rec["key"]
    store.append_partial(k, [("t", "test", 0, "red", True), ("t", "test", 1, "blue")])
    for line in store.partial_path(k).read_text().splitlines():
        json.loads(line)
    assert {d for (_, _, d), r in store.load_partial(k).items() if r.nonfinite} == {0}  # flags survive a resume
    store.write(rec)
    text = store.record_path(k).read_text()
    assert json.loads(text)["key"] == k
    assert "NaN" not in text and json.loads(text)["metrics"]["other"] is None  # strict JSON, never NaN


UNSAFE = [
    (re.compile(r"\bimport (c?pickle|dill|joblib|marshal)\b|\b(c?pickle|dill|joblib|marshal)\.loads?\("), "pickle"),
    (re.compile(r"\btorch\.load\((?!.*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"(?<![\w.])eval\(|(?<![\w.])exec\("), "eval/exec"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"use_safetensors\s*=\s*False|weights_only\s*=\s*False"), "unsafe weights loading"),
    (re.compile(r"yaml\.load\(|yaml\.unsafe_load|UnsafeLoader|FullLoader"), "unsafe yaml"),
]


#: reviewed exceptions, file -> reason (anything else found fails the test)
ALLOWED: dict[str, str] = {}


def test_no_unsafe_loading_in_the_code():
    """Static guard: nothing in harness/ or methods/ unpickles, evals, or loads YAML unsafely."""
    hits = []
    for path in sorted([*ROOT.glob("harness/**/*.py"), *ROOT.glob("methods/**/*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for rx, what in UNSAFE:
                if ALLOWED.get(str(path.relative_to(ROOT))) == what:
                    continue
                if rx.search(code) and "safe_load" not in code:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)
