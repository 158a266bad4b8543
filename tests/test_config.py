"""Config composition and validation: every bad value is one clear line, before anything loads."""
import pytest

from harness.config import ConfigError, compose_config, group_options, validate, validate_against_model


def test_default_composition():
    cfg = compose_config([])
    assert cfg.model.name == "tiny" and cfg.method.name == "none" and cfg.benchmark.name == "shapes"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert cfg.model.trust_remote_code is False
    assert validate(cfg).name == "none"


def test_groups_have_the_papers_benchmarks_and_models():
    for name in ["gqa", "mme", "pope", "scienceqa_img", "textvqa_val", "mmbench_en_dev", "seedbench",
                 "vqav2_val", "mmmu_val", "mmstar", "flickr30k_test", "shapes",
                 "ocrbench", "docvqa_val", "infovqa_val", "chartqa", "hallusion_bench_image"]:
        assert name in group_options("benchmark")
        cfg = compose_config([f"benchmark={name}"])
        assert cfg.benchmark.task and cfg.benchmark.metric in cfg.benchmark.metrics
    for name in ["tiny", "llava15_7b", "llava15_13b", "llava_next_7b", "llava_next_13b", "qwen2_vl_7b", "qwen2_5_vl_7b",
                 "llava_onevision_7b"]:
        assert compose_config([f"model={name}"]).model.name == name


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=gpt5"], "unknown model 'gpt5'"),
        (["method=magic"], "unknown method 'magic'"),
        (["benchmark=imagenet"], "unknown benchmark 'imagenet'"),
        (["run.limit=abc"], "run.limit must be a positive integer"),
        (["run.limit=-3"], "run.limit must be a positive integer"),
        (["run.batch_size=0"], "run.batch_size must be a positive integer"),
        (["run.device=gpu7"], "run.device must be"),
        (["run.dtype=float8"], "run.dtype must be one of"),
        (["run.typo=1"], "unknown config key 'run.typo'"),
        (["method.params.R=0.5"], "unknown config key 'method.params.R'"),
        (["model.attn_implementation=magic"], "model.attn_implementation must be one of"),
        (["logger.mode=loud"], "logger.mode must be"),
        (["benchmark.split=train"], "benchmark.split must be val or test"),
    ],
)
def test_bad_values_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_full_size_configs_validate_on_meta_without_weights():
    for name in ["llava15_7b", "llava_next_13b"]:
        cfg = compose_config([f"model={name}"])
        _, adapter, _ = validate_against_model(cfg, validate(cfg))
        assert adapter.visual_tokens_per_image == 576
        assert next(adapter.model.parameters()).device.type == "meta"


def test_experiment_is_a_named_combination():
    cfg = compose_config(["experiment=quick"])
    assert (cfg.model.name, cfg.benchmark.split, cfg.logger.name, cfg.run.limit) == ("tiny", "val", "none", 64)
    assert compose_config(["experiment=quick", "run.limit=3"]).run.limit == 3


def test_compositions_are_memoised_but_never_stale(monkeypatch):
    """A sweep composes each cell several times (validation, progress, the final check): Hydra composes it
    once per process; callers get their own copy, and an edited config file composes afresh."""
    import os

    import hydra

    from harness import config as C

    monkeypatch.setattr(C, "_COMPOSED", {})
    calls = []
    real = hydra.compose
    monkeypatch.setattr(hydra, "compose", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = C.compose_config(["method=fastv", "run.limit=3"])
    b = C.compose_config(["method=fastv", "run.limit=3"])
    assert len(calls) == 1 and a == b
    from omegaconf import open_dict

    with open_dict(a):
        a.run.limit = 99
    assert C.compose_config(["method=fastv", "run.limit=3"]).run.limit == 3  # a caller's edit stays its own
    C.compose_config(["method=fastv", "run.limit=4"])
    assert len(calls) == 2
    path = C.CONF_DIR / "method" / "fastv.yaml"
    st = path.stat()
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        C.compose_config(["method=fastv", "run.limit=3"])
        assert len(calls) == 3
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    # interpolations resolve when read, so an environment change is seen through a memoised composition
    monkeypatch.setenv("VTBENCH_STORE", "/tmp/elsewhere-store")
    assert C.compose_config(["method=fastv", "run.limit=3"]).store.dir == "/tmp/elsewhere-store"


@pytest.mark.parametrize("extra", [
    ["budget.kind=tokens", "budget.value=0.33"],
    ["budget.kind=flops", "budget.value=0.6", "model=llava15_7b"],
    ["budget.kind=tokens", "budget.value=96", "model=llava_next_13b", "run.limit=20"],
    [],
])
def test_shortv_auto_preset_is_the_same_cell_as_its_overrides(extra):
    """`method=shortv_auto` (make eval's ShortV) is `method=shortv method.params.layers=auto
    method.params.N=0`: the same composed method, the same record key, the same validated method."""
    from harness.results import record_key
    from harness.config import resolved

    preset = compose_config(["method=shortv_auto", *extra])
    long = compose_config(["method=shortv", "method.params.layers=auto", "method.params.N=0", *extra])
    assert preset.method == long.method
    assert record_key(resolved(preset)) == record_key(resolved(long))
    assert validate(preset).params() == validate(long).params()


# ---- calibration settings of cells that calibrate on first use -----------------------------------------------
def _calibrating(*extra):
    from harness.config import validate_against_model

    cfg = compose_config(["model=tiny", "method=shortv", "method.params.layers=auto", "method.params.N=2", *extra])
    return validate_against_model(cfg, validate(cfg))


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, key", [
    (["calibration.dir={file}"], "calibration.dir={file}: exists and is not a directory"),
    (["calibration.dir={file}/sub"], "calibration.dir={file}/sub: cannot be created"),
    (["calibration.n=100000000"], "calibration.n=100000000: the calibration split shapes:val has only 500"),
    (["calibration.n=501"], "calibration.n=501:"),
    (["calibration.split=test", "calibration.n=501"], "calibration.n=501: the calibration split shapes:test"),
])
def test_calibration_settings_are_checked_before_the_model_loads(extra, key, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        _calibrating(*[x.format(file=f) for x in extra])
    assert str(e.value).startswith(key.format(file=f)), str(e.value)
    assert f.read_text() == "x" and not (tmp_path / "afile" / "sub").exists()


def test_calibration_settings_matter_only_for_cells_that_calibrate(tmp_path):
    from harness.config import validate_against_model

    f = tmp_path / "afile"
    f.write_text("x")
    _calibrating("calibration.n=500", f"calibration.dir={tmp_path / 'new' / 'dir'}")  # creatable, fits
    assert not (tmp_path / "new").exists()
    for method in (["method=fastv"], ["method=shortv", "method.params.layers=[1,2]", "method.params.N=2"]):
        cfg = compose_config(["model=tiny", *method, f"calibration.dir={f}", "calibration.n=100000000"])
        validate_against_model(cfg, validate(cfg))
