"""Calibration runs: ShortV's Layer Contribution and RedundancyLens' greedy Layer Ranking.

    vtbench-calibrate method=shortv [model=tiny] [calibration.benchmark=shapes] [calibration.n=40]
    vtbench-calibrate method=redundancylens [calibration.n=40] [calibration.seed=0]

The calibration data are `calibration.n` samples of `calibration.benchmark` (for the built-in `shapes`,
its val split, so the test split stays unseen), drawn deterministically by `calibration.seed` and
encoded exactly as the evaluation encodes them. Artefacts are JSON files under `calibration.dir`, keyed
by model (id + architecture hash), data, sample count, seed, method and kind; a second run with the
same key reuses the file. `vtbench` calls the same code when a method asks for `layers=auto` without
an artefact path, so a sweep calibrates once per model and reuses it.

ShortV: visual LC (the ranking the method uses) and text LC (for the analysis figure).
RedundancyLens: one greedy ranking per reduction (Hollow Attention, Dynamic FFN) with the KL-agreement
validation metric of `methods.redundancylens.kl_evaluator` (see the method's docstring).
"""
from __future__ import annotations


from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, needs_calibration


def _bench_cfg(cfg: DictConfig) -> DictConfig:
    name = cfg.calibration.benchmark
    path = CONF_DIR / "benchmark" / f"{name}.yaml"
    if not path.is_file():
        from harness.config import ConfigError, group_options

        raise ConfigError(f"unknown calibration.benchmark {name!r} (available: {', '.join(group_options('benchmark'))})")
    bench = OmegaConf.load(path)
    if bench.get("builtin"):
        bench.split = cfg.calibration.split
    return bench


def calibration_batches(cfg: DictConfig, model, processor) -> tuple[list[dict], str, int]:
    """Left-padded model-input batches of the calibration samples, their data id and count."""
    from harness.benchmarks.prepare import prepare
    from harness.lmms_model import VTBenchLMM
    from harness.tasks import _quiet_libraries, load_tasks
    from methods._shared.calibration import select_samples

    cal = cfg.calibration
    bench = _bench_cfg(cfg)
    with _quiet_libraries():
        task_name, include = prepare(bench, cfg.data_dir)
        _, task_dict = load_tasks(task_name, include)
    task = next(t for t in task_dict.values() if hasattr(t, "test_docs"))
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    idx = select_samples(len(docs), int(cal.n), int(cal.seed))
    lm = VTBenchLMM(model=model, processor=processor, progress=False)
    batches = []
    bs = int(cal.batch_size)
    for start in range(0, len(idx), bs):
        chunk = [docs[i] for i in idx[start : start + bs]]
        contexts = [task.doc_to_text(d) for d in chunk]
        visuals = [list(task.doc_to_visual(d) or []) for d in chunk]
        batches.append(lm.encode(contexts, visuals))
    data_id = f"{bench.name}:{bench.get('split') or bench.task}"
    return batches, data_id, len(idx)


def _model_id(cfg: DictConfig) -> str:
    from harness.results import model_source

    src = model_source(OmegaConf.to_container(cfg.model, resolve=True))
    fp = src.get("checkpoint_sha256") or src.get("commit")
    return f"{cfg.model.name}:{cfg.model.pretrained}@{cfg.model.get('revision') or 'main'}" + (f"#{fp}" if fp else "")


def shortv_artefacts(cfg, model, processor, adapter, kinds=("visual", "text")) -> dict[str, dict]:
    from methods._shared.calibration import layer_contribution_artefact

    batches, data_id, n = calibration_batches(cfg, model, processor)
    out = {}
    for kind in kinds:
        out[kind] = layer_contribution_artefact(
            model, adapter, batches, model_id=_model_id(cfg), data_id=data_id, n_samples=n,
            seed=int(cfg.calibration.seed), cache_dir=cfg.calibration.dir, kind=kind, method="shortv",
        )
    return out


def redundancylens_artefacts(cfg, model, processor, adapter, method=None) -> dict[str, dict]:
    from methods._shared.calibration import config_hash, greedy_layer_ranking, load_or_compute, reused_image_features
    from methods.redundancylens import kl_evaluator

    batches, data_id, n = calibration_batches(cfg, model, processor)
    # the reduction's own settings change the ranking: they are part of the key
    params = {k: v for k, v in (method.params() if method else {}).items()
              if k in ("window", "hollow_block", "ffn_keep", "probe_ratio", "probe_sampling", "seed")}
    out = {}
    for reduction in ("hollow", "ffn"):
        key_parts = {
            "model_id": _model_id(cfg), "config_hash": config_hash(model.config), "data_id": data_id,
            "n_samples": n, "seed": int(cfg.calibration.seed), "method": "redundancylens", "kind": reduction,
            "params": params, "tail": int(cfg.calibration.tail), "alpha": float(cfg.calibration.alpha),
        }

        def compute(reduction=reduction):
            from harness.execution import yield_now

            def evaluate(layers):  # one greedy step at a time: a waiting timing part goes first (harness.execution)
                yield_now()
                return kl(layers)

            # every candidate reduces LLM layers only: the image encoder runs once per batch, not once per candidate
            with reused_image_features(model, adapter):
                kl = kl_evaluator(model, adapter, batches, reduction, **params)
                res = greedy_layer_ranking(
                    adapter.num_llm_layers, evaluate, tail=int(cfg.calibration.tail), alpha=float(cfg.calibration.alpha)
                )
            return {"ranking": res["ranking"], "scores": res["rounds"], "base": res["base"]}

        out[reduction] = load_or_compute(key_parts, compute, cfg.calibration.dir, num_layers=adapter.num_llm_layers)
    return out


def resolve_auto(cfg, method, model, processor, adapter):
    """Fill in calibration artefacts for 'auto' layer lists (computing or reusing them); returns the
    method to apply and the artefact info for the record."""
    import methods as registry

    if not needs_calibration(method):
        return method, None
    if method.name == "compose":  # each member calibrates as it would alone (on the unpatched model)
        members, info = [], {}
        for i, m in enumerate(method._build_members()):
            resolved, m_info = resolve_auto(cfg, m, model, processor, adapter)
            members.append({"name": resolved.name, "params": resolved.params()})
            if m_info:
                info[f"members.{i}.{m.name}"] = m_info
        composed = registry.build("compose", {"members": members})
        composed.validate(adapter)
        return composed, info
    if method.name == "shortv":
        arts = shortv_artefacts(cfg, model, processor, adapter, kinds=("visual",))
        params = dict(method.params(), calibration=arts["visual"]["path"])
    else:
        arts = redundancylens_artefacts(cfg, model, processor, adapter, method)
        params = dict(method.params(), calibration_hollow=arts["hollow"]["path"], calibration_ffn=arts["ffn"]["path"])
    resolved = registry.build(method.name, params)
    resolved.validate(adapter)
    info = {k: {"path": a["path"], "key": a["key"], "ranking": a["ranking"]} for k, a in arts.items()}
    return resolved, info
