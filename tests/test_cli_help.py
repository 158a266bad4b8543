"""Every console script answers `-h` / `--help` with its usage on stdout and exit 0 (the Hydra-style scripts
`vtbench-calibrate` and `vtbench-prepare` used to read `--help` as a malformed override; `vtbench-flops`
printed its usage as an error, exit 1)."""
from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_is_usage_on_stdout_and_exit_0(script, flag, capsys):
    module, _, _ = SCRIPTS[script].partition(":")
    main = importlib.import_module(module).main
    try:
        rc = main([flag])
    except SystemExit as e:  # argparse's own --help
        rc = e.code
    out, err = capsys.readouterr()
    assert rc in (0, None), (script, rc, err)
    assert script in out or script.replace("-", "_") in out, out[:200]
    assert "error" not in err.lower() and "Traceback" not in err


# ---- bad path / name / list options: one line naming the option, exit 2, nothing written ----------------
#: (script, argv, the option the line must name); `{file}` is a regular file, `{store}` an existing empty
#: folder, `{missing}` a path that does not exist
BAD_OPTIONS = [
    ("vtbench-report", ["--store", ""], "--store"),
    ("vtbench-report", ["--store", "{missing}"], "--store"),
    ("vtbench-report", ["--store", "{file}"], "--store"),
    ("vtbench-report", ["--store", "{store}", "--out", ""], "--out"),
    ("vtbench-report", ["--store", "{store}", "--out", "{file}"], "--out"),
    ("vtbench-report", ["--store", "{store}", "--out", "{file}/sub"], "--out"),
    ("vtbench-wandb-report", ["--store", ""], "--store"),
    ("vtbench-wandb-report", ["--store", "{missing}"], "--store"),
    ("vtbench-wandb-report", ["--store", "{file}"], "--store"),
    ("vtbench-wandb-report", ["--store", "{store}", "--dir", ""], "--dir"),
    ("vtbench-wandb-report", ["--store", "{store}", "--dir", "{file}"], "--dir"),
    ("vtbench-wandb-report", ["--store", "{store}", "--figures", "{missing}"], "--figures"),
    ("vtbench-wandb-report", ["--store", "{store}", "--figures", "{file}"], "--figures"),
    ("vtbench-wandb-report", ["--store", "{store}", "--figures", ""], "--figures"),
    ("vtbench-wandb-report", ["--store", "{store}", "--group", ""], "--group"),
    ("vtbench-paper", ["--out", ""], "--out"),
    ("vtbench-paper", ["--out", "{file}"], "--out"),
    ("vtbench-paper", ["--store", ""], "--store"),
    ("vtbench-paper", ["--store", "{missing}"], "--store"),
    ("vtbench-paper", ["--model", ""], "--model"),
    ("vtbench-paper", ["--model-override", "run.limit=nan"], "run.limit=nan"),
    ("vtbench-paper", ["--part", "figures", "--model-override", "nosuch.key=1"], "nosuch.key"),
    ("vtbench-bench", ["--quick", "--parts", ""], "--parts"),
    ("vtbench-bench", ["--quick", "--parts", ","], "--parts"),
    ("vtbench-bench", ["--quick", "--methods", ""], "--methods"),
    ("vtbench-bench", ["--quick", "--batch-methods", ""], "--batch-methods"),
    ("vtbench-bench", ["--quick", "--flops-methods", ""], "--flops-methods"),
    ("vtbench-bench", ["--quick", "--parts", "overhead", "--batch-methods", "bogus"], "--batch-methods"),
    ("vtbench-bench", ["--quick", "--parts", "overhead", "--flops-methods", "bogus"], "--flops-methods"),
    ("vtbench-bench", ["--quick", "--parts", "overhead", "--methods", "bogus"], "--methods"),
    ("vtbench-bench", ["--quick", "--parts", "overhead,bogus"], "--parts"),
    ("vtbench-bench", ["--quick", "--machine", "../../x"], "--machine"),
    ("vtbench-bench", ["--quick", "--machine", "a/b"], "--machine"),
    ("vtbench-bench", ["--quick", "--machine", ""], "--machine"),
    ("vtbench-bench", ["--quick", "--machine", "."], "--machine"),
    ("vtbench-bench", ["--quick", "--machine", ".."], "--machine"),
    ("vtbench-bench", ["--quick", "--out", ""], "--out"),
    ("vtbench-bench", ["--quick", "--out", "{file}"], "--out"),
    ("vtbench-bench", ["--gpu-full", "--parts", ""], "--parts"),
    ("vtbench-bench", ["--gpu-full", "--machine", "../x"], "--machine"),
]


def _call(script, argv, capsys):
    module, _, _ = SCRIPTS[script].partition(":")
    main = importlib.import_module(module).main
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, *capsys.readouterr()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def places(tmp_path, monkeypatch):
    for var in ("VTBENCH_STORE", "VTBENCH_WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "store").mkdir()
    return {"file": str(tmp_path / "afile"), "store": str(tmp_path / "store"), "missing": str(tmp_path / "nope")}


@pytest.mark.bad_input
@pytest.mark.parametrize("script, argv, option", BAD_OPTIONS,
                         ids=[f"{s}:{' '.join(a) or 'empty'}" for s, a, _ in BAD_OPTIONS])
def test_bad_path_name_or_list_option_is_one_line_exit_2_nothing_written(script, argv, option, places, tmp_path,
                                                                            capsys):
    argv = [a.format(**places) for a in argv]
    before = _tree(tmp_path)
    rc, out, err = _call(script, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:") and option in lines[0], err
    assert "Traceback" not in err and out == ""
    assert _tree(tmp_path) == before  # nothing written: no tables/, results/, runs/, <out>.md


@pytest.mark.parametrize("script", ["vtbench-report", "vtbench-wandb-report"])
def test_an_existing_empty_store_is_no_records_exit_1(script, places, tmp_path, capsys):
    before = _tree(tmp_path)
    rc, out, err = _call(script, ["--store", places["store"], "--out" if script == "vtbench-report" else "--dir",
                                  str(tmp_path / "o")], capsys)
    assert rc == 1 and "no complete records" in err and len(err.strip().splitlines()) == 1, err
    assert _tree(tmp_path) == before


def test_wandb_dir_from_the_environment_is_checked_like_the_option(places, monkeypatch, capsys):
    monkeypatch.setenv("VTBENCH_WANDB_DIR", places["file"])
    rc, out, err = _call("vtbench-wandb-report", ["--store", places["store"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--dir" in err and places["file"] in err, err


@pytest.mark.slow  # lmms-eval retries the offline download (about 17 s)
def test_prepare_unavailable_data_is_one_line_exit_2_nothing_on_stdout(places, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc, out, err = _call("vtbench-prepare", ["benchmark=gqa"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and out == "", (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("vtbench-prepare: error: benchmark=gqa:"), err
