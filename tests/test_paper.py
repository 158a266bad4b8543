"""`make paper` (harness.paper), the reproduction recipes (conf/experiment/repro_*.yaml), the SLURM/local
launcher presets and the sweep-level W&B report run (harness.wandb_report)."""
from __future__ import annotations

import csv
import glob
import os
import time
from pathlib import Path

import pytest

from harness import paper
from harness.cli import paper as paper_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("repro_*.yaml"))
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


# ---- FLOPs tables --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flops_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    paper.write_flops(out)
    return out


def _rows(flops_dir, stem):
    with open(flops_dir / f"{stem}.csv") as f:
        return list(csv.DictReader(f))


def test_every_value_matches_or_is_explained(flops_dir):
    for stem in paper.TABLES:
        rows = _rows(flops_dir, stem)
        assert rows, stem
        for r in rows:
            assert r["match"] in ("✓", "✗", "≈"), r
            assert (r["ours (at printed precision)"] == r["printed"]) == (r["match"] in ("✓", "≈")), r
            if r["match"] != "✓":
                assert len(r["note"]) > 40, f"{stem}: unexplained {r['match']} in {r['setting']} {r['quantity']}"
        md = (flops_dir / f"{stem}.md").read_text()
        assert md.count("\n| ") == len(rows) + 1  # header + one line per row


def test_shortv_tables_reproduced_exactly(flops_dir):
    from methods.shortv import shortv_paper_tflops

    rows = _rows(flops_dir, "flops_shortv_table1") + _rows(flops_dir, "flops_shortv_table2")
    assert all(r["match"] == "✓" for r in rows)
    # the ours column is computed: it agrees with methods/shortv.py's independent formula (spec A7)
    for model, entries in paper.SHORTV_T2.items():
        cfg = paper.full_config(model)
        for n, printed, _ in entries:
            ref = shortv_paper_tflops(cfg, n)
            row = next(r for r in rows if r["setting"] == f"{paper.FULL_MODELS[model]} N={n}" and r["quantity"] == "TFLOPs")
            assert float(row["ours (exact)"]) == pytest.approx(ref["shortv"], abs=1e-4)
            assert float(row["ours (at printed precision)"]) == ref["shortv_printed"] == float(printed)
    # printed values are the transcribed ones (a wrong transcription would show up as a ✗)
    r = next(r for r in rows if r["setting"] == "LLaVA-NeXT-13B N=32" and r["quantity"] == "TFLOPs")
    assert r["printed"] == "27.5" and "two-step rounding" in r["note"]


def test_fastv_table_against_method_formula(flops_dir):
    from methods.fastv import fastv_paper_flops

    rows = _rows(flops_dir, "flops_fastv_table1")
    for model, key in (("llava15_7b", "7B"), ("llava15_13b", "13B")):
        for K, R, printed, _ in paper.FASTV_T1[model]:
            name = f"{paper.FULL_MODELS[model]} " + (f"K={K} R={R:.0%}" if K is not None else "vanilla (n=")
            row = next(r for r in rows if r["setting"].startswith(name) and r["quantity"].startswith("FLOPs(B)"))
            ref = fastv_paper_flops(key, K, R) if K is not None else fastv_paper_flops(key)
            assert float(row["ours (exact)"]) == pytest.approx(ref, abs=1e-3)
            assert row["printed"] == printed
    # every 13B row and the K=2 rows of 7B match; the 7B vanilla value is the paper's known inconsistency
    assert all(r["match"] == "✓" for r in rows if r["setting"].startswith("LLaVA-1.5-13B"))
    assert all(r["match"] == "✓" for r in rows if " K=2 " in r["setting"])
    van = next(r for r in rows if r["setting"].startswith("LLaVA-1.5-7B vanilla") and r["quantity"].startswith("FLOPs"))
    assert (van["ours (at printed precision)"], van["printed"], van["match"]) == ("99.2", "99.3", "✗")
    assert "n=612" in van["note"]


def test_ficoco_labels(flops_dir):
    from methods.ficoco_v import ficoco_paper_tflops

    rows = _rows(flops_dir, "flops_ficoco_labels")
    for v, printed in ((576, "8.5"), (192, "3.3"), (64, "1.6")):
        row = next(r for r in rows if r["setting"].startswith(f"LLaVA-1.5-7B: {v} visual") and r["printed"] == printed)
        assert float(row["ours (exact)"]) == pytest.approx(ficoco_paper_tflops(v), abs=1e-4)
        assert row["match"] == "✓"
    inferred = [r for r in rows if "inferred" in r["setting"]]
    assert inferred and all(r["match"] == "≈" and "round to it" in r["note"] for r in inferred)
    progressive = [r for r in rows if "progressive schedule" in r["setting"]]
    assert [r["printed"] for r in progressive] == ["3.3", "2.4", "1.5"]
    assert all(float(r["ours (exact)"]) > float(r["printed"]) and "structural" in r["note"] for r in progressive)


def test_committed_flops_tables_are_regenerated(flops_dir):
    committed = ROOT / "results" / "paper"
    files = sorted(committed.glob("flops_*.*"))
    if not files:
        pytest.skip("results/paper has no committed FLOPs tables yet")
    for p in files:
        assert p.read_text() == (flops_dir / p.name).read_text(), f"{p} differs from `vtbench-paper --part flops`"


# ---- motivating figures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg(tiny_checkpoint):
    return paper.load_cfg("tiny", [f"model.pretrained={tiny_checkpoint}"])


def test_attention_shares_sum_to_one(tiny_cfg):
    probe = paper.Probe(tiny_cfg, attn="eager")
    docs = paper.samples(3, seed=1)  # 3 docs: one batch of 3 with left padding
    s = paper.attention_shares(probe, docs)
    assert s.shape == (probe.adapter.num_llm_layers, 3)
    assert (s >= 0).all()
    assert s.sum(1) == pytest.approx([1.0] * s.shape[0], abs=1e-4)
    assert (s[:, 1] > 0).all()  # the image tokens get attention


def test_samples_are_seeded():
    a, b, c = paper.samples(4, 0), paper.samples(4, 0), paper.samples(4, 1)
    assert [d["id"] for d in a] == [d["id"] for d in b] != [d["id"] for d in c]


def test_figures_written_and_deterministic(tiny_checkpoint, tmp_path):
    (tmp_path / "empty-store").mkdir()  # a store given explicitly must exist (a missing one is bad input)
    args = ["--part", "figures", "--model", "tiny", "--model-override", f"model.pretrained={tiny_checkpoint}",
            "--store", str(tmp_path / "empty-store"), "--samples", "4"]
    assert paper_cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    names = sorted(p.name for p in (tmp_path / "a" / "figures").iterdir())
    assert names == sorted(f"{n}.{e}" for n in ("shortv_layer_contribution", "fastv_attention_share",
                                                "redundancylens_reduced_layers") for e in ("png", "pdf"))
    assert paper_cli.main(args + ["--out", str(tmp_path / "b"), "--figures", "lc,attention"]) == 0
    for n in ("shortv_layer_contribution", "fastv_attention_share"):
        for e in ("png", "pdf"):
            assert (tmp_path / "a" / "figures" / f"{n}.{e}").read_bytes() == (tmp_path / "b" / "figures" / f"{n}.{e}").read_bytes()


def test_redundancy_curve_starts_at_reference(tiny_cfg):
    docs = paper.samples(2, seed=0)
    curves = paper.redundancy_curve(tiny_cfg, docs)
    L = paper.Probe(tiny_cfg).adapter.num_llm_layers
    for name, pts in curves.items():
        assert [round(p[0], 6) for p in pts] == [round(k / L, 6) for k in range(L + 1)], name
        assert pts[0][2] == 1.0  # no reduced layer: the reference answers themselves


def test_ficoco_figure_from_store(cell_overrides, tmp_path, capsys):
    from harness.config import compose_config
    from harness.efficiency.probe import measure_cell
    from harness.runner import run_cell

    store = tmp_path / "store"
    assert paper.fig_accuracy_vs_tflops(str(store), tmp_path / "figs") == []
    assert "skipping" in capsys.readouterr().err
    eff = ["run.efficiency.enabled=true", "run.efficiency.probe_size=1", "run.efficiency.warmup=0",
           "run.efficiency.repeats=1", "run.limit=2"]
    for m in (["method=none"], ["method=random", "method.params.keep=8"]):
        run_cell(compose_config(cell_overrides + eff + m), efficiency_fn=measure_cell)
    written = paper.fig_accuracy_vs_tflops(str(store), tmp_path / "figs")
    assert sorted(p.name for p in written) == ["ficoco_accuracy_vs_tflops_tiny_shapes.pdf",
                                               "ficoco_accuracy_vs_tflops_tiny_shapes.png"]


# ---- reproduction recipes ------------------------------------------------------------------------------
def test_recipes_exist():
    for name in ("repro_shortv_llava15_7b", "repro_fastv_llava15_7b", "repro_ficoco_llava15_7b",
                 "repro_vanilla_llava15_7b", "repro_shortv_nsweep_llava15_7b", "repro_shortv_table5_llava15_7b"):
        assert name in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_every_cell_validates(name):
    from omegaconf import OmegaConf

    from harness.config import compose_config, validate
    from harness.sweep import _expand

    raw = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml")
    # each axis's values as Hydra's own parser splits them (a value may be a list: `[300,200,110],[66,30,17]`)
    params = {k: [c[0].split("=", 1)[1] for c in _expand([f"{k}={v}"])] for k, v in raw.hydra.sweeper.params.items()}
    assert len(_expand([f"{k}={','.join(v)}" for k, v in params.items()])) > 1
    # every value of every axis is composed and validated (all method settings on the first benchmark, then
    # every benchmark with the first method setting), which keeps the test fast
    others = {k: v for k, v in params.items() if k != "benchmark"}
    combos = [c + [f"benchmark={params['benchmark'][0]}"] for c in _expand([f"{k}={','.join(v)}" for k, v in others.items()])]
    combos += [[f"{k}={v[0]}" for k, v in others.items()] + [f"benchmark={b}"] for b in params["benchmark"][1:]]
    for combo in combos:
        cfg = compose_config([f"experiment={name}", *combo])
        validate(cfg, check_device=False)  # the recipes' values; run.device=cuda is checked where they run
        llava = cfg.model.family in ("llava", "llava_next")
        # LLaVA checkpoints in float16 with the vicuna_v1 template; Qwen2-VL in bfloat16 (its published dtype) with
        # the checkpoint processor's own chat template
        assert cfg.model.name != "tiny" and cfg.run.device == "cuda"
        assert cfg.run.dtype == ("float16" if llava else "bfloat16")
        assert cfg.run.batch_size == 1 and cfg.run.limit is None
        assert cfg.logger.group == name
        if llava:
            assert cfg.model.chat_template.startswith("{% for message in messages %}")
        else:
            assert cfg.model.chat_template is None
        if cfg.method.name == "shortv" and "nsweep" not in name:
            assert len(cfg.method.params.layers) in (19, 24)  # the paper's layers (conf/model_method)
        if cfg.method.name == "compose":  # ShortV + FastV: the paper's layers, FastV at the 29 % setting
            shortv, fastv = cfg.method.params.members
            assert len(shortv.params.layers) == 19 and (fastv.params.K, fastv.params.R) == (2, 0.6)


@pytest.mark.slow
def test_shortv_table5_composition_flops():
    """ShortV Table 5's 29 %: the composition with FastV K=2, R=60% (R=50% gives 34 %)."""
    config = paper.full_config("llava15_7b")
    rows = {r.setting: r for r in paper.shortv_table5()}
    assert rows["LLaVA-1.5-7B ShortV (N=19) + FastV (K=2, R=60%)"].ours == "29"
    assert rows["LLaVA-1.5-7B ShortV (N=19) + FastV (K=2, R=50%)"].ours == "34"
    lo, hi = paper._table5_r_range(config, 19, 2, "29")
    assert lo <= 0.6 <= hi


def test_vicuna_template_renders_like_the_processor(tiny_checkpoint):
    """The recipes' vicuna_v1 template = the system prompt + the processor's own USER/ASSISTANT layout, and
    its <image> placeholder (from the content items) expands to the image tokens like the processor's."""
    from PIL import Image
    from transformers import AutoProcessor

    from harness.config import compose_config

    tpl = compose_config(["experiment=repro_shortv_llava15_7b"]).model.chat_template
    llava = [n for n in RECIPES if compose_config([f"experiment={n}"]).model.family in ("llava", "llava_next")]
    assert llava and all(compose_config([f"experiment={n}"]).model.chat_template == tpl for n in llava)
    proc = AutoProcessor.from_pretrained(tiny_checkpoint)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    ours = proc.apply_chat_template(msgs, add_generation_prompt=True, chat_template=tpl)
    own = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert ours == SYSTEM + " USER: <image>\nWhat colour is the star? ASSISTANT:"
    assert ours == SYSTEM + " " + own
    img = Image.new("RGB", (64, 64), "white")
    ids = proc(images=[img], text=[ours], return_tensors="pt")["input_ids"][0]
    ids_own = proc(images=[img], text=[own], return_tensors="pt")["input_ids"][0]
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (ids == image_id).sum() == (ids_own == image_id).sum() > 0
    assert ids[0] == proc.tokenizer.bos_token_id


def test_launcher_presets():
    from hydra import compose, initialize_config_dir

    from harness.config import CONF_DIR

    for preset, target, gpus in (("slurm_gpu", "SlurmLauncher", 1), ("local_parallel", "LocalLauncher", 0)):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target)
        assert cfg.hydra.launcher.gpus_per_node == gpus


# ---- sweep-level W&B report run ------------------------------------------------------------------------
def test_wandb_report_run(cell_overrides, tmp_path):
    from harness import wandb_report
    from harness.cli import wandb_report as wandb_report_cli
    from harness.config import compose_config
    from harness.runner import run_cell

    recs = {}
    for m, group in (("none", "sweepA"), ("random", "sweepA"), ("fastv", "other")):
        cfg = compose_config(cell_overrides + [f"method={m}", "run.limit=2", f"logger.group={group}"])
        recs[m] = run_cell(cfg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = tmp_path / "extra"
    extra.mkdir()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(extra / "extra_figure.png")
    plt.close(fig)

    wdir = tmp_path / "wandb-report"
    rc = wandb_report_cli.main(["--store", str(tmp_path / "store"), "--group", "sweepA", "--dir", str(wdir),
                            "--figures", str(extra)])
    assert rc == 0
    runs = glob.glob(str(wdir / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    needles = ("report-sweepA", "sweepA", "report", "table/tiny_shapes_limit2", "figures/extra_figure")
    for _ in range(60):  # the W&B service may still be flushing the offline file after finish()
        blob = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
        if all(n.encode() in blob for n in needles):
            break
        time.sleep(0.5)
    for needle in needles:
        assert needle.encode() in blob, needle
    tables = glob.glob(os.path.join(runs[0], "files", "media", "table", "**", "*.json"), recursive=True)
    assert len(tables) == 1
    text = open(tables[0]).read()
    assert recs["none"]["key"] in text and recs["random"]["key"] in text
    assert recs["fastv"]["key"] not in text  # another sweep's cell
    # the cell runs themselves were logged in their sweep's group
    cell_blobs = [open(p, "rb").read() for p in glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))]
    assert sum(b"sweepA" in b for b in cell_blobs) == 2
    assert wandb_report_cli.main(["--store", str(tmp_path / "store"), "--group", "nope", "--dir", str(wdir)]) == 1


def test_redundancylens_qwen2vl_rows(flops_dir):
    """RedundancyLens' Qwen2-VL-7B FLOPs column: both FastV rows (72 %, 53 %) reproduce at one solved visual
    count under the A7 convention, and RedundancyLens on about half the layers lands within a point of 71 %."""
    from harness import paper

    rows = paper.redundancylens_qwen2vl()
    solved = [r for r in rows if "(solved)" in r.setting]
    assert [r.match for r in solved[:2]] == ["≈", "≈"] and all(r.ours == r.printed for r in solved[:2])
    assert abs(float(solved[2].exact) - 71) < 1.0 and "layers" in solved[2].setting
    assert all(r.note for r in rows)  # every row states what had to be assumed
