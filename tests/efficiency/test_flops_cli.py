"""`vtbench-flops`: JSON output parses, the table states its convention, errors are one line."""
from __future__ import annotations

import json

import pytest

from harness.cli.flops import main


@pytest.mark.slow
def test_json_output(capsys):
    assert main(["model=llava15_7b", "method=none", "format=json", "convention=shortv"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layout"] == {"before": 1, "visual": 576, "after": 63, "images": 1, "total": 640, "image_hw": [336, 336]}
    assert r["prefill"]["source"] == "counted" and r["prefill"]["total"]["match"] is True
    assert r["decode"]["total"]["match"] is True
    assert r["prefill"]["components"]["llm"]["counted"] == 8_504_035_246_080
    assert round(r["conventions"]["shortv"]["total"] / 1e12, 2) == 8.50
    assert r["unit"].startswith("FLOPs")


@pytest.mark.slow
def test_table_output(capsys):
    assert main(["model=llava15_7b", "text_tokens=16", "convention=ficoco"]) == 0
    out = capsys.readouterr().out
    assert "prefill counted" in out and "FLOPs = 2 x MACs" in out
    assert "convention ficoco:" in out and "8.45 TFLOPs" in out
    assert "1 text + 576 image + 15 text = 592 tokens" in out


@pytest.mark.parametrize("final, label", [(192, "3.30"), (128, "2.45"), (64, "1.61")])
def test_ficoco_l_budget_label(capsys, final, label):
    """FiCoCo's TFLOPs labels (3.3 / 2.4 / 1.5 T) are the dense LLM with the final visual count; the
    progressive schedule's own FLOPs under the same convention are printed beside them, higher."""
    assert main(["model=llava15_7b", "method=ficoco_l", f"method.params.final_tokens={final}",
                 "convention=ficoco"]) == 0
    out = capsys.readouterr().out
    own = float(out.split("convention ficoco: ")[1].split(" TFLOPs")[0])
    assert f"convention ficoco, budget label: {label} TFLOPs ({final} visual tokens)" in out
    assert own > float(label) + 2.0  # layers 0-3 see all 576 visual tokens


@pytest.mark.parametrize(
    "args,msg",
    [
        (["model=nope"], "unknown model"),
        (["format=xml"], "format must be"),
        (["text_tokens=zero"], "text_tokens"),
        (["convention=foo"], "convention must be"),
        (["model=llava15_7b", "image=12"], "image must be"),
        (["model=llava15_7b", "method=none", "method.params.bogus=1"], "bogus"),
    ],
)
def test_errors_are_one_line(capsys, args, msg):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and msg in err and err.startswith("vtbench-flops: error:")


def test_ficoco_vl_budget_label_counts_every_crop(capsys):
    """On LLaVA-NeXT FiCoCo-VL's `tokens` is per crop: the label keeps that share of all 2880 tokens."""
    assert main(["model=llava_next_7b", "method=ficoco_vl", "method.params.tokens=192", "convention=ficoco"]) == 0
    assert "(960 visual tokens)" in capsys.readouterr().out


def _meta_forward_ok(name: str) -> bool:
    """Does one counted prefill of LLaVA-1.5-7B on the meta device run with `name` at the bench budget
    (192 of 576 visual tokens; ShortV with the paper's layer list)?"""
    from omegaconf import OmegaConf

    import methods
    from harness.bench import flops_cli_params
    from harness.config import compose_config
    from harness.efficiency import flops as F
    from harness.models import get_adapter
    from harness.models.loading import config_from_cfg, meta_model

    cfg = compose_config(["model=llava15_7b", f"method={name}", *flops_cli_params(name, 576, 32)])
    config = config_from_cfg(cfg.model)
    model = meta_model(config)
    params = OmegaConf.to_container(cfg.method.params, resolve=True) if cfg.method.get("params") else {}
    methods.build(name, params).apply(model, get_adapter(model))
    try:
        F.count_prefill(model, F.synthetic_inputs(config))
    except RuntimeError as e:
        assert "meta" in str(e)  # the value read (.item(), bool of a meta tensor), nothing else
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("name", ["none", "random", "fastv", "tome", "ficoco_v", "ficoco_l", "ficoco_vl",
                                  "shortv", "redundancylens", "visionzip", "vispruner", "divprune"])
def test_meta_countable_flag_is_true(name):
    """`vtbench-flops` skips the meta forward of methods flagged meta_countable=False: the flag must say
    what a real meta forward does, in both directions."""
    import methods

    assert methods.get(name).meta_countable == _meta_forward_ok(name)


def test_value_reading_method_is_not_tried(capsys, monkeypatch):
    from harness.efficiency import flops as F

    def boom(*a, **k):
        raise AssertionError("the meta forward must not run")

    monkeypatch.setattr(F, "count_prefill_and_decode", boom)
    assert main(["model=llava15_7b", "method=fastv", "method.params.keep=192", "format=json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prefill"]["source"] == "analytic" and r["decode"]["source"] == "analytic"
    assert "cannot run on the meta device" in r["notes"][0]
    assert set(r["timing"]) == {"setup", "count", "analytic"}
