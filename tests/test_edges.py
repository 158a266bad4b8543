"""Edges a new user meets (issue 33): each error one line naming what to change, nothing cut or hidden."""
from __future__ import annotations

import random
import string

import pytest

from harness.config import ConfigError, compose_config


# ---- the single-cell summary table ---------------------------------------------------------------
def _record(method: str) -> dict:
    return {"cell": {"model": {"name": "tiny"}, "method": {"name": "x"}, "benchmark": {"name": "shapes", "task": "t"}},
            "method_description": method, "accuracy": 0.5, "n_samples": 3, "n_failed": 0, "n_empty": 0, "key": "k"}


def test_summary_table_keeps_every_character_of_a_long_value():
    """A composition's description (both members) is wrapped, never cut; every line has the table's width."""
    from harness.cli.main import VALUE_WIDTH, format_record

    rng = random.Random(0)
    words = ["shortv(layers=[7, 6], N=None)", "+", "fastv(K=2,", "R=0.5,", "keep_ratio=0.33,", "positions=keep)"]
    cases = [" ".join(words), "x" * 130, "a" * (VALUE_WIDTH + 1), ""]
    cases += ["".join(rng.choice(string.ascii_letters + " ,=()[]") for _ in range(rng.randint(1, 200)))
              for _ in range(200)]
    for desc in cases:
        table = format_record(_record(desc))
        lines = table.splitlines()
        assert len({len(ln) for ln in lines}) == 1, table
        method_lines = []
        for ln in lines[1:-1]:
            key, value = ln[1:-1].split("|")
            if key.strip() == "method" or (method_lines and not key.strip()):
                method_lines.append(value[1:-1])
            elif method_lines:
                break
        assert "".join(p.strip() for p in method_lines).replace(" ", "") == desc.replace(" ", ""), (desc, table)


# ---- Hydra's sweep syntax without -m ----------------------------------------------------------------
@pytest.mark.parametrize("override", ["method=none,fastv", "run.seed=0,1", "benchmark.split=val,test"])
def test_a_comma_list_without_multirun_keeps_hydras_hint_in_one_line(override):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{override}: ")
    assert "-m (--multirun)" in line and f"vtbench -m {override}" in line


# ---- a sweep's bad input names its cell ---------------------------------------------------------------
@pytest.mark.parametrize("overrides,cell", [
    (["method=fastv,tome", "method.params.R=0.3"], "method=tome"),
    (["method=random,fastv", "method.params.K=3"], "method=random"),
    (["method=fastv", "method.params.K=1,40", "run.seed=0,1"], "method.params.K=40 run.seed=0"),
])
def test_sweep_validation_names_the_failing_cell(overrides, cell, capsys):
    from harness.errors import bad_input_errors
    from harness.sweep import run_multirun, sweep_error_line, validate_sweep

    with pytest.raises(bad_input_errors()) as e:
        validate_sweep(overrides)
    assert e.value.sweep_cell == cell
    assert sweep_error_line(e.value).startswith(f"[{cell}] ")
    if cell == "method=tome":  # the line `vtbench -m` prints (the example)
        assert run_multirun(overrides) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"vtbench: error: [{cell}] method.params.R=0.3: unknown config key 'method.params.R' "
                           "(check the spelling; method parameters are listed in conf/method/)"), err


def test_cell_label_is_empty_for_one_cell():
    from harness.sweep import cell_label

    assert cell_label(["method=fastv", "run.seed=0"], [["method=fastv", "run.seed=0"]]) == ""
    combos = [["method=fastv", "run.seed=0"], ["method=fastv", "run.seed=1"]]
    assert [cell_label(c, combos) for c in combos] == ["run.seed=0", "run.seed=1"]


# ---- a token count that reads like a percent --------------------------------------------------------
def test_percent_like_token_count_rule():
    from harness.budget import percent_like_warning

    for n in (50, 144, 576, 2928):
        for v in [0.1, 0.5, 1, 1.0, 2, 2.0, 33, 50, 50.0, 64, 100, 101, 128, 192, 576]:
            line = percent_like_warning({"kind": "tokens", "value": v}, n)
            want = float(v).is_integer() and 2 <= v <= 100 and v <= n
            assert (line is not None) == want, (v, n, line)
            if line:
                assert "\n" not in line and line.startswith(f"vtbench: warning: budget.value={v:g}: ")
                assert f"budget.value={v / 100:g}" in line
        assert percent_like_warning({"kind": "flops", "value": 50}, n) is None
        assert percent_like_warning(None, n) is None


def test_percent_like_token_count_warns_once_before_the_cell(capsys, tiny_checkpoint):
    from harness.config import validate, validate_against_model

    def check(value):
        cfg = compose_config([f"model.pretrained={tiny_checkpoint}", "method=fastv", "budget.kind=tokens",
                              f"budget.value={value}"])
        validate_against_model(cfg, validate(cfg))
        validate_against_model(cfg, validate(cfg))
        return [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]

    assert check(0.5) == []  # a share
    lines = check(50)  # the tiny checkpoint has 64 visual tokens per image: 50 is a count of them
    assert len(lines) == 1 and lines[0].startswith("vtbench: warning: budget.value=50: "), lines
    assert check(1) == []  # 1 token: not a percent anyone types


# ---- benchmark data that is neither online nor cached ----------------------------------------------------
def _retry_error(inner: BaseException):
    import tenacity

    fut = tenacity.Future(attempt_number=5)
    fut.set_exception(inner)
    return tenacity.RetryError(fut)


@pytest.mark.parametrize("offline", [True, False])
def test_offline_data_error_is_one_line_naming_the_benchmark_and_cause(offline, monkeypatch):
    from harness.tasks import data_error_line

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(v, "1" if offline else "0")
    cause = ConnectionError("Couldn't reach 'lmms-lab/GQA' on the Hub (OfflineModeIsEnabled)\nmore detail")
    for e in (_retry_error(cause), cause):
        wrapped = RuntimeError("outer")
        wrapped.__cause__ = e
        for err in (e, wrapped):
            line = data_error_line("gqa", err)
            assert "\n" not in line and line.startswith("benchmark.task=gqa: "), line
            assert "ConnectionError: Couldn't reach 'lmms-lab/GQA'" in line and "Future" not in line, line
            assert ("HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0" in line) == offline, line


def test_load_tasks_error_unwraps_retries(monkeypatch):
    """Through harness.tasks.load_tasks, as `vtbench benchmark=gqa` meets it offline."""
    import lmms_eval.tasks as lt

    from harness.benchmarks.prepare import BenchmarkDataError
    from harness.tasks import load_tasks

    class TM:
        all_tasks = ["gqa"]

        def __init__(self, *a, **k):
            pass

    def fail(*a, **k):
        raise _retry_error(ConnectionError("Couldn't reach 'lmms-lab/GQA' on the Hub (OfflineModeIsEnabled)"))

    monkeypatch.setattr(lt, "TaskManager", TM)
    monkeypatch.setattr(lt, "get_task_dict", fail)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BenchmarkDataError) as e:
        load_tasks("gqa", None)
    assert str(e.value).startswith("benchmark.task=gqa: the data is not in the Hugging Face cache")
    assert "RetryError" not in str(e.value) and "ConnectionError" in str(e.value)
