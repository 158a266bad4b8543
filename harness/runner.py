"""Evaluate one cell (model x method x benchmark x seed) end to end.

Order matters: everything that can fail cheaply fails first, in one line, before the model loads —
config values, method parameters, the method against the architecture (meta device), the results
store, the benchmark data — and nothing is written to the store until the record is complete.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time

from omegaconf import DictConfig

from harness.config import resolved, validate, validate_against_model
from harness.tasks import _quiet_libraries, load_tasks  # noqa: F401
from harness.results import ResultsStore, cell_identity, record_key
from harness.schema import RECORD_SCHEMA


def _log(msg: str) -> None:
    print(f"[vtbench] {msg}", file=sys.stderr, flush=True)


def _read_strict(docs, i: int):
    """Document `i` with its images fully decoded, truncated image data refused."""
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        doc = docs[i]
        for v in doc.values() if isinstance(doc, dict) else ():
            for im in v if isinstance(v, (list, tuple)) else (v,):
                if hasattr(im, "load") and hasattr(im, "size"):  # a PIL image: decode the pixels
                    im.load()
        return doc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def check_docs(task_dict, limit: int | None) -> list[str]:
    """Read (and so decode, images included) every document the evaluation will use, before any model
    loads: an undecodable image or row fails the cell in one line naming the document, instead of a
    traceback from the middle of lmms-eval after the generation work. Truncated images, which lmms-eval
    deliberately accepts (PIL's LOAD_TRUNCATED_IMAGES), are evaluated but returned as `task/doc_id` so
    the record flags them."""
    from harness.benchmarks.prepare import BenchmarkDataError

    truncated = []
    for name, task in task_dict.items():
        docs = getattr(task, "eval_docs", None)
        if docs is None:
            continue
        total = len(docs)
        for i in range(total if limit is None else min(limit, total)):
            try:
                try:
                    _read_strict(docs, i)
                except OSError as e:
                    if "truncated" not in str(e).lower():
                        raise
                    truncated.append(f"{name}/{i}")
                    docs[i]  # readable when truncation is tolerated (lmms-eval's own setting)?
            except Exception as e:  # PIL / arrow / decoding errors of many types
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise BenchmarkDataError(
                    f"benchmark data of task {name!r} is corrupt: document {i} cannot be read "
                    f"({type(e).__name__}: {first})"
                ) from None
    return truncated


def _task_objects(task_dict) -> list:
    from lmms_eval.api.task import Task

    objs = [t for t in task_dict.values() if isinstance(t, Task)]
    return objs if len(objs) == len(task_dict) else None


def _metrics_of(results: dict, task: str) -> dict:
    raw = results.get("results", {}).get(task, {})
    out = {}
    for k, v in raw.items():
        if k == "alias" or "_stderr" in k:
            continue
        name = k.split(",", 1)[0]
        if isinstance(v, (int, float)):
            out[name] = float(v)
    return out


def _samples_of(results: dict, task: str, metrics: list[str]) -> list[dict]:
    rows = []
    for s in results.get("samples", {}).get(task, []) or []:
        resp = s.get("filtered_resps") or s.get("resps") or [""]
        while isinstance(resp, (list, tuple)) and resp:
            resp = resp[0]
        row = {"doc_id": int(s.get("doc_id")), "target": str(s.get("target")), "prediction": str(resp)}
        for m in metrics:
            if m in s and isinstance(s[m], (int, float, bool)):
                row[m] = float(s[m])
        rows.append(row)
    rows.sort(key=lambda r: r["doc_id"])
    return rows


def run_cell(cfg: DictConfig, *, efficiency_fn=None) -> dict:
    """Evaluate one cell and return its record (reusing a complete one unless `run.force`)."""
    t_start = time.perf_counter()
    method = validate(cfg)
    conf = resolved(cfg)
    key = record_key(conf)
    store = ResultsStore(cfg.store.dir)
    existing = store.get(key)
    if existing and existing.get("status") == "complete" and not cfg.run.force:
        _log(f"cell {key} already complete in {store.root}: reusing it (run.force=true re-evaluates)")
        _note_code_change(existing)
        existing["_reused"] = True
        return existing
    from harness.execution import device_lock

    # the set-up computes too (meta model, checkpoint hashes, the benchmark's data, lmms-eval's task index,
    # decoding the documents): held shared like the answering, so no other process's timing part runs
    # meanwhile; released before the cell's lock below (a process never waits for a cell holding the device)
    with device_lock(cfg.run.device).shared():
        method, _, budget_info = validate_against_model(cfg, method)  # bad input: before the store is touched
        from harness.budget import budget_note

        if note := budget_note(budget_info):  # the report flags the row too
            _log(f"warning: budget.kind={cfg.budget.kind} budget.value={cfg.budget.value}: {note} "
                 "(the cell runs at the closest setting)")
        from harness.models.checkpoint import check_available

        check_available(cfg.model)  # the checkpoint's files (harness/models/checkpoint.py), before the store is touched
        store.check_writable()

        from harness.benchmarks.prepare import prepare

        with _quiet_libraries():
            task, include = prepare(cfg.benchmark, cfg.data_dir)
            tm, task_dict = load_tasks(task, include)
            truncated = check_docs(task_dict, cfg.run.limit)
    if truncated:
        _log(f"warning: {len(truncated)} truncated image(s) in the benchmark data, flagged in the record: "
             f"{', '.join(truncated[:5])}{' ...' if len(truncated) > 5 else ''}")

    # one evaluator per cell: a concurrent sweep on the same store waits here, then reuses the record
    with store.cell_lock(key):
        existing = store.get(key)
        if existing and existing.get("status") == "complete" and not cfg.run.force:
            _log(f"cell {key} was completed by another process: reusing it")
            existing["_reused"] = True
            return existing
        # computing on the device: shared with other vtbench processes, except the probe's timing part
        # (exclusive) and, between answer batches, any timing part that waits (harness.execution)
        with device_lock(cfg.run.device).shared():
            record = _evaluate(cfg, conf, key, store, method, budget_info, task, include, tm, task_dict,
                               efficiency_fn, t_start, truncated)
    return record


def _evaluate(cfg, conf, key, store, method, budget_info, task, include, tm, task_dict, efficiency_fn, t_start,
              truncated=()):
    import torch

    from harness.lmms_model import VTBenchLMM
    from harness.models.loading import load_model

    from harness.execution import describe, device_lock, for_cell

    execution = for_cell(cfg)  # this process's workers / threads (torch threads set here)
    lock = device_lock(cfg.run.device)
    _log(f"cell {key}: model={cfg.model.name} method={method.describe()} benchmark={cfg.benchmark.name}")
    torch.manual_seed(cfg.run.seed)
    t_load = time.perf_counter()
    model, processor, adapter = load_model(cfg.model, cfg.run.device, cfg.run.dtype)
    method.validate(adapter)
    from harness.calibration import resolve_auto

    t_cal = time.perf_counter()
    method, calibration_info = resolve_auto(cfg, method, model, processor, adapter)
    calibration_seconds = time.perf_counter() - t_cal
    method.apply(model, adapter)
    load_seconds = time.perf_counter() - t_load - calibration_seconds

    from harness.environment import code_fingerprint

    code = code_fingerprint()
    done = store.load_partial(key, code)
    done_nonfinite = {f"{t}/{d}" for (t, _, d), row in done.items() if row.nonfinite}
    if done:
        _log(f"resuming cell {key}: {len(done)} answers already produced")
    lm = VTBenchLMM(
        model=model,
        processor=processor,
        adapter=adapter,
        batch_size=cfg.run.batch_size,
        max_new_tokens=cfg.run.max_new_tokens,
        chat_template=cfg.model.get("chat_template"),
        on_batch=lambda rows: (store.append_partial(key, rows, code), lock.yield_point()),
    )
    lm.lookup = lambda t, s, d: getattr(done.get((t, s, int(d))), "answer", None)
    if cfg.benchmark.name == "shapes":
        from harness.recall import track

        # asked-cell recall per sample and LLM layer (harness/recall.py); answers resumed from an interrupted
        # attempt bring their own, so the record equals an uninterrupted run's
        lm.recall = {f"{t}/{d}": row.recall for (t, _, d), row in done.items() if row.recall is not None}
        track(model, True)  # the vision encoder's merge bookkeeping, off again before anything is timed

    from lmms_eval.evaluator import simple_evaluate

    t_eval = time.perf_counter()
    objs = _task_objects(task_dict)
    with _quiet_libraries():
        results = simple_evaluate(
            model=lm,
            tasks=objs if objs is not None else [task],
            task_manager=tm,
            limit=cfg.run.limit,
            batch_size=cfg.run.batch_size,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=cfg.run.seed,
            numpy_random_seed=cfg.run.seed,
            torch_random_seed=cfg.run.seed,
            fewshot_random_seed=cfg.run.seed,
            verbosity="WARNING",
            process_docs_parallel=1,
        )
    eval_seconds = time.perf_counter() - t_eval
    if results is None:
        raise RuntimeError("lmms-eval returned no results")
    metrics = _metrics_of(results, task)
    primary = cfg.benchmark.metric
    samples = _samples_of(results, task, list(cfg.benchmark.metrics))
    asked_recall = None
    if lm.recall is not None:
        from harness.recall import summarize, track

        track(model, False)

        for smp in samples:
            r = lm.recall.get(f"{task}/{smp['doc_id']}")
            if r is not None:
                smp["asked_recall_per_layer"] = [None if x is None else round(x, 6) for x in r]
        asked_recall = summarize({f"{task}/{smp['doc_id']}": smp.get("asked_recall_per_layer") for smp in samples})
    # non-finite flags of answers reused from an interrupted attempt are kept (same record either way)
    evaluated = {f"{task}/{s['doc_id']}" for s in samples}
    nonfinite = sorted(set(lm.nonfinite) | (done_nonfinite & evaluated), key=_doc_order)

    efficiency = None
    t_eff = time.perf_counter()
    if cfg.run.efficiency.enabled and efficiency_fn is not None:
        efficiency = efficiency_fn(cfg, model, processor, adapter, method, lm, task_dict)
    efficiency_seconds = time.perf_counter() - t_eff

    from harness.environment import environment

    # a cell in which every sample failed is a failed cell (rerun retries it), not a complete one
    status, error = "complete", None
    if samples and len(lm.failures) >= len(samples):
        first = next(iter(lm.failures.values()), "")
        status, error = "failed", f"all {len(samples)} samples failed (first: {first})"
    record = {
        "schema": RECORD_SCHEMA,
        "key": key,
        "status": status,
        "error": error,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cell": cell_identity(conf),
        "config": conf,
        "method_description": method.describe(),
        "method_simulated": bool(getattr(method, "simulated", False)),
        "method_params": method.params(),
        "budget": budget_info or None,
        "calibration": calibration_info,
        "primary_metric": primary,
        "accuracy": metrics.get(primary),
        "metrics": metrics,
        "n_samples": len(samples),
        "n_failed": len(lm.failures),
        "n_empty": lm.n_empty,
        "failures": lm.failures,
        "n_nonfinite": len(nonfinite),
        "nonfinite": nonfinite,
        "n_resumed": len(done),
        "n_truncated_images": len(truncated),
        "truncated_images": list(truncated),
        "asked_recall": asked_recall,
        "samples": samples,
        "efficiency": efficiency,
        "environment": environment(cfg.run.device),
        # how it ran: worker processes of the sweep, torch threads, the device lock (latency: efficiency.latency)
        "execution": describe(execution, lock),
        "data": {"task": task, "include_path": include, "dataset": _dataset_info(cfg)},
        # where the cell's time went: set-up before the model loads (validation, identity, data), model
        # loading, calibration (first use of an 'auto' artefact only), answering, the efficiency probe, logging
        "timing": {"setup_seconds": round(t_load - t_start, 3), "load_seconds": round(load_seconds, 3),
                   "calibration_seconds": round(calibration_seconds, 3), "eval_seconds": round(eval_seconds, 3),
                   "efficiency_seconds": round(efficiency_seconds, 3), "logging_seconds": None, "cell_seconds": None},
    }
    from harness.wandb_log import log_cell

    t_log = time.perf_counter()
    record["wandb"] = (log_cell(record, conf.get("logger"), conf, _doc_inputs(task_dict, task))
                       if status == "complete" else None)
    record["timing"]["logging_seconds"] = round(time.perf_counter() - t_log, 3)
    record["timing"]["cell_seconds"] = round(time.perf_counter() - t_start, 3)
    store.write(record)
    return record


def _note_code_change(rec: dict) -> None:
    """A reused record made by other vtbench code is served (the identity covers settings, files and
    package versions, not every source edit) but never silently: say so."""
    from harness.environment import code_fingerprint

    made_by = ((rec.get("environment") or {}).get("code_sha256"))
    if made_by and made_by != code_fingerprint():
        _log(f"note: record {rec['key']} was made by other vtbench code ({made_by}, now {code_fingerprint()}); "
             "run.force=true re-evaluates it with this code")


def _doc_inputs(task_dict, task: str):
    """`doc_id -> (question text, first image or None)` of the evaluated task (for the W&B sample table)."""
    obj = task_dict.get(task)
    docs = getattr(obj, "eval_docs", None)

    def inputs(doc_id: int):
        try:
            doc = docs[int(doc_id)]
            visuals = obj.doc_to_visual(doc) if callable(getattr(obj, "doc_to_visual", None)) else []
            image = next((v for v in visuals or [] if hasattr(v, "convert")), None)
            return str(obj.doc_to_text(doc)), image
        except Exception:  # a logging nicety: never fail a cell for it
            return None, None

    return inputs if docs is not None else None


def _doc_order(tag: str):
    task, _, doc = tag.rpartition("/")
    return (task, int(doc) if doc.isdigit() else -1, doc)


def _dataset_info(cfg) -> dict:
    bench = cfg.benchmark
    if bench.get("builtin"):
        from harness.benchmarks.prepare import shapes_task_dir

        meta = shapes_task_dir(cfg.data_dir, int(bench.get("seed", 0))) / "meta.json"
        try:
            import json

            return {"path": str(meta.parent), "meta": json.loads(meta.read_text())}
        except (OSError, ValueError):
            return {"path": str(meta.parent)}
    return {"task": bench.task, "hf_datasets_cache": os.environ.get("HF_DATASETS_CACHE")}


def write_failed(cfg: DictConfig, reason: str) -> None:
    """Record a cell that failed at run time (never overwrites a complete record)."""
    conf = resolved(cfg)
    key = record_key(conf)
    store = ResultsStore(cfg.store.dir)
    if store.is_complete(key):
        return
    # the per-sample answers in partial/ are kept, so a retry resumes where the failure happened
    record = {
        "schema": RECORD_SCHEMA,
        "key": key,
        "status": "failed",
        "error": reason,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cell": cell_identity(conf),
        "config": conf,
    }
    from harness.results import atomic_write_text
    from harness.schema import dumps_sealed

    try:
        atomic_write_text(store.record_path(key), dumps_sealed(record, indent=1))
    except OSError as e:  # a full/unwritable store must not turn one failed cell into a crashed sweep
        _log(f"warning: cannot record the failure of cell {key}: {e.strerror or e}")


def efficiency_fn():
    """The efficiency probe, if the efficiency package is available."""
    try:
        from harness.efficiency.probe import measure_cell
    except ImportError:
        return None
    return measure_cell
