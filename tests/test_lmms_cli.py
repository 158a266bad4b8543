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
