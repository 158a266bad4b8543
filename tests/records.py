"""Valid records for tests of the store and the report (the store refuses anything else; `store.write`
seals them, `harness.schema.dumps_sealed` seals one written by hand)."""
from __future__ import annotations

from harness.schema import RECORD_SCHEMA, identity_hash


def make_record(method="none", scores=(1.0,), preds=None, *, params=None, flops=None, status="complete",
                model="tiny", benchmark="shapes", split="test", limit=None, seed=0, batch_size=1, budget=None,
                efficiency=True, extra_cell=None, **fields) -> dict:
    """A complete (or failed) record whose key is the hash of its cell, as the runner writes them."""
    preds = list(preds) if preds is not None else ["x"] * len(scores)
    cell = {"schema": 2, "model": {"name": model, "pretrained": "builtin:tiny-llava", "dtype": "float32"},
            "method": {"name": method, "params": params or {}}, "budget": budget,
            "benchmark": {"name": benchmark, "task": "vtbench_shapes", "split": split, "seed": 0},
            "limit": limit, "seed": seed, "batch_size": batch_size, "efficiency": efficiency, **(extra_cell or {})}
    rec = {"schema": RECORD_SCHEMA, "key": identity_hash(cell), "status": status, "created": "2026-01-01T00:00:00+00:00", "cell": cell,
           "config": {}}
    if status == "failed":
        return {**rec, "error": "RuntimeError: boom", **fields}
    acc = sum(scores) / len(scores) if scores else None
    samples = [{"doc_id": i, "target": "t", "prediction": p, "exact_match": float(s)}
               for i, (s, p) in enumerate(zip(scores, preds))]
    eff = None
    if flops is not None:
        eff = {"flops": {"prefill": {"llm": flops, "total": flops}}, "latency": {"prefill_ms": {"median": flops / 1e9}}}
    rec.update({"primary_metric": "exact_match", "accuracy": acc, "metrics": {"exact_match": acc},
                "n_samples": len(samples), "n_failed": 0, "n_empty": sum(not p for p in preds), "samples": samples,
                "method_params": params or {}, "efficiency": eff})
    rec.update(fields)
    return rec
