"""vtbench-calibrate and `layers=auto`: artefacts computed once, reused, deterministic, used by cells."""
import json
import os

import pytest

from harness.cli.calibrate import main
from harness.config import compose_config
from harness.runner import run_cell


def _args(tiny_checkpoint, data_dir, cal_dir, *extra):
    return [f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"calibration.dir={cal_dir}",
            "calibration.n=4", *extra]


def test_shortv_calibration_is_cached_and_deterministic(tiny_checkpoint, data_dir, tmp_path, capsys):
    assert main(_args(tiny_checkpoint, data_dir, tmp_path / "a", "method=shortv")) == 0
    files = sorted((tmp_path / "a").glob("*.json"))
    assert [f.name.split("-")[1] for f in files] == ["text", "visual"]
    visual = json.loads(files[1].read_text())
    assert sorted(visual["ranking"]) == list(range(4)) and len(visual["scores"]) == 4
    # the last layer's visual updates cannot reach the last token: its contribution is exactly 0
    assert visual["scores"][-1] == 0.0
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert main(_args(tiny_checkpoint, data_dir, tmp_path / "a", "method=shortv")) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not recomputed
    assert main(_args(tiny_checkpoint, data_dir, tmp_path / "b", "method=shortv")) == 0
    again = json.loads(sorted((tmp_path / "b").glob("shortv-visual-*.json"))[0].read_text())
    assert again["scores"] == visual["scores"] and again["ranking"] == visual["ranking"]


@pytest.mark.bad_input
def test_calibrating_a_method_without_calibration_is_an_error(tiny_checkpoint, data_dir, tmp_path, capsys):
    assert main(_args(tiny_checkpoint, data_dir, tmp_path, "method=fastv")) == 2
    assert "needs no calibration" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_layers_calibrate_inside_a_cell(cell_overrides, tmp_path):
    cfg = compose_config(cell_overrides + [f"calibration.dir={tmp_path / 'cal'}", "calibration.n=4",
                                           "method=shortv", "method.params.layers=auto", "method.params.N=2",
                                           "run.limit=2"])
    rec = run_cell(cfg)
    art = rec["calibration"]["visual"]
    assert os.path.isfile(art["path"]) and rec["method_params"]["calibration"] == art["path"]
    assert rec["cell"]["calibration"]["n"] == 4


@pytest.mark.parametrize("how", ["resealed_ranking", "truncated", "unsealed"])
def test_a_corrupt_cached_artefact_is_named_and_recomputed(tiny_checkpoint, data_dir, tmp_path, capsys, how):
    from harness.schema import SEAL_FIELD, dumps_sealed

    args = _args(tiny_checkpoint, data_dir, tmp_path, "method=shortv")
    assert main(args) == 0
    (path,) = tmp_path.glob("shortv-visual-*.json")
    good = json.loads(path.read_text())
    data = {k: v for k, v in good.items() if k != SEAL_FIELD}
    if how == "resealed_ranking":
        path.write_text(dumps_sealed(dict(data, ranking=sorted(data["ranking"]) if data["ranking"] != [0, 1, 2, 3]
                                          else [3, 2, 1, 0])))
    elif how == "truncated":
        path.write_text(path.read_text()[:50])
    else:
        path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "invalid calibration artefact" in line] == [
        line for line in err.splitlines() if str(path) in line] and err.count(str(path)) == 1
    assert json.loads(path.read_text()) == good  # computed again, the same
