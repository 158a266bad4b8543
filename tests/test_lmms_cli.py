"""vtbench through lmms-eval's own command line (`lmms-eval --model vtbench --model_args <vtbench overrides>`),
as the README documents it: model and method groups, budgets, lmms-eval's flags, and failures that fail."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


def _lmms(args, tmp_path, env):
    return subprocess.run([os.path.join(BIN, "lmms-eval"), "--model", "vtbench", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def lmms_include(data_dir):
    """`vtbench-prepare` (the documented way to get lmms-eval's --include_path), run once per session."""
    env = dict(os.environ, VTBENCH_DATA=data_dir, WANDB_MODE="offline")
    return subprocess.run([os.path.join(BIN, "vtbench-prepare")], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def lmms_env(lmms_include, data_dir, tmp_path):
    env = dict(os.environ, VTBENCH_DATA=data_dir, WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
               VTBENCH_STORE=str(tmp_path / "store"))
    return env, lmms_include


@pytest.mark.slow
def test_documented_command_with_a_budget_and_lmms_eval_flags(lmms_env, tmp_path):
    env, include = lmms_env
    args = ["--model_args", "model=tiny,method=fastv,budget.kind=tokens,budget.value=0.33", "--include_path", include,
            "--tasks", "vtbench_shapes", "--limit", "8", "--batch_size", "auto", "--output_path", str(tmp_path / "out"),
            "--log_samples", "--use_cache", str(tmp_path / "cache"), "--wandb_args", "project=vtbench-test,name=fastv"]
    first = _lmms(args, tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    # FastV's resolved parameters: 33 % of the tiny model's 144 visual tokens reach the LLM
    line = re.search(r"\[vtbench\] model=tiny method=fastv\((.*)\).*", first.stderr)
    assert line and "keep_ratio=0.33" in line.group(1) and "visual_tokens_to_llm=48" in line.group(0), first.stderr[-2000:]
    assert "batch_size=1" in line.group(0)  # `auto` = the cell's run.batch_size
    assert "exact_match" in first.stdout
    (res,) = [p for p in (tmp_path / "out").rglob("*_results.json")]
    data = json.loads(res.read_text())
    assert data["model_name"] == "tiny" and "vtbench_shapes" in data["results"]
    assert list((tmp_path / "out").rglob("*_samples_vtbench_shapes.jsonl"))
    assert list((tmp_path / "cache").rglob("*.db")) and list(tmp_path.glob("wandb/offline-run-*"))
    # again from lmms-eval's response cache: the same numbers
    again = _lmms(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    row = lambda out: [ln for ln in out.splitlines() if ln.startswith("|vtbench_shapes")]  # noqa: E731
    assert row(again.stdout) == row(first.stdout)


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("model_args, code, message", [
    ("model=nosuch", 2, "unknown model 'nosuch'"),
    ("model=tiny,method=fastv,method.params.R=1.5", 2, "R must be in [0, 1)"),
    ("model=tiny,model.pretrained=/nonexistent/ckpt", 2, "not found"),
])
def test_a_failed_load_fails_lmms_eval(lmms_env, tmp_path, model_args, code, message):
    env, include = lmms_env
    out = _lmms(["--model_args", model_args, "--include_path", include, "--tasks", "vtbench_shapes", "--limit", "2"],
                tmp_path, env)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("vtbench:")]
    assert out.returncode == code and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--model_args", "model"], "--model_args 'model': expected key=value"),
    (["--model_args", "=tiny"], "--model_args '=tiny': empty key"),
    (["--model_args", "model=tiny,,method=fastv"], "empty item"),
    (["--model_args", "model=tiny,model=tiny"], "--model_args model: given twice"),
    (["--model_args", "model=tiny,batch_size=2"], "--model_args batch_size=2"),
    (["--model_args", "model=tiny", "--batch_size", "auto:0"], "--batch_size='auto:0'"),
    (["--model_args", "model=tiny", "--batch_size", "autox"], "--batch_size='autox'"),
], ids=["no-equals", "empty-key", "empty-item", "duplicate", "batch-size-twice", "auto-0", "auto-junk"])
def test_malformed_model_args_and_batch_size_are_one_line_exit_2(lmms_env, tmp_path, args, message):
    env, include = lmms_env
    out = _lmms([*args, "--include_path", include, "--tasks", "vtbench_shapes", "--limit", "4",
                 "--output_path", str(tmp_path / "out")], tmp_path, env)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("vtbench:")]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert lines[0].startswith("vtbench: error:") and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_model_args_parsing():
    from harness.lmms_model import parse_model_args

    assert parse_model_args("") == {}
    assert parse_model_args("model=tiny, method=fastv,model.pretrained=007") == \
        {"model": "tiny", "method": "fastv", "model.pretrained": "007"}
    assert parse_model_args("method.params.layers=[1,2],x='a,b'") == {"method.params.layers": "[1,2]", "x": "'a,b'"}
    for bad in ("model", "=x", "a=1,a=2", "a=1,", ",a=1"):
        with pytest.raises(ValueError, match="--model_args"):
            parse_model_args(bad)
