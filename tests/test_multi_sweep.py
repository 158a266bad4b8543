"""Several sweeps in one command (`vtbench -m <sweep> --next <sweep>`, `harness.sweep`): every cell of every
sweep validated before any runs, then one sweep (numbered across, one folder per sweep), the same records
as the sweeps run one by one; an empty sweep or a bad cell in a later sweep is one line, exit 2, nothing
written. `make eval` runs its three grids this way (tests/test_budget.py reads its command)."""
from __future__ import annotations

import pytest

from harness.config import ConfigError
from harness.sweep import split_sweeps
from tests.reliability.helpers import comparable, records
from tests.reliability.test_bad_inputs import args, no_model_load, nothing_written, one_line_error, our_lines  # noqa: F401


def test_split_sweeps():
    assert split_sweeps(["method=none,fastv", "run.limit=3"]) == [["method=none,fastv", "run.limit=3"]]
    assert split_sweeps(["a=1", "--next", "b=2,3", "c=4", "--next", "d=5"]) == [["a=1"], ["b=2,3", "c=4"], ["d=5"]]
    assert split_sweeps([]) == [[]]  # no override at all: the defaults, as before
    for bad in (["a=1", "--next"], ["--next", "a=1"], ["a=1", "--next", "--next", "b=2"]):
        with pytest.raises(ConfigError, match="--next: sweep [0-9] of [0-9] has no overrides"):
            split_sweeps(bad)


def test_a_bad_cell_in_a_later_sweep_runs_nothing(args, tmp_path, capsys, monkeypatch, no_model_load):  # noqa: F811
    from harness.sweep import run_multirun

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    rc = run_multirun([*args, "method=none,fastv", "--next", *args, "method=fastv", "method.params.R=0.5,nan"])
    line = one_line_error(capsys, rc)
    assert line.startswith("vtbench: error: [sweep 2 of 2: method.params.R=nan]") and "R=nan" in line, line
    rc = run_multirun([*args, "method=none", "--next"])
    assert "--next: sweep 2 of 2 has no overrides" in one_line_error(capsys, rc)
    from harness.cli.main import main

    rc = main([*args, "method=none", "--next", "method=fastv"])  # not a multirun
    assert "--next separates the sweeps of a multirun" in one_line_error(capsys, rc)
    nothing_written(tmp_path / "store")
    assert not (tmp_path / "hydra").exists()


@pytest.mark.slow  # eight cells (about 12 s)
def test_sweeps_in_one_command_write_the_records_of_separate_sweeps(args, tmp_path, capsys, monkeypatch):  # noqa: F811
    from harness.sweep import run_multirun

    serial = [*args, "run.workers=1"]
    one = [*serial, "method=none,blind"]
    two = [*serial, "method=random", "method.params.seed=0,1", "budget.kind=tokens", "budget.value=0.25"]
    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "together"))
    assert run_multirun([*one, "--next", *two]) == 0
    err = capsys.readouterr().err
    together = records(tmp_path / "store")
    assert len(together) == 4
    assert "cell 1/4: " in err and "cell 4/4: " in err and "cell 3/4: " in err  # numbered across the sweeps
    # one Hydra folder per sweep under the command's, each with its jobs
    (when,) = [p for p in (tmp_path / "together").glob("*/*")]
    assert sorted(p.name for p in when.iterdir()) == ["1", "2"]
    assert sorted(p.name for p in (when / "1").iterdir() if p.is_dir()) == ["0", "1"]
    assert sorted(p.name for p in (when / "2").iterdir() if p.is_dir()) == ["0", "1"]
    # the final table names each cell by what tells it from the others in both sweeps
    assert "method=random method.params.seed=1 budget.kind=tokens budget.value=0.25" in err
    # the same sweeps one after the other, into another store: the same cells, the same answers
    sep = [a.replace(str(tmp_path / "store"), str(tmp_path / "separate")) for a in (*one, "--next", *two)]
    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "apart"))
    assert run_multirun(sep[: sep.index("--next")]) == 0
    assert run_multirun(sep[sep.index("--next") + 1:]) == 0
    apart = records(tmp_path / "separate")
    assert sorted(apart) == sorted(together)
    for key in together:
        assert comparable(together[key]) == comparable(apart[key]), key
