"""lmms-eval hooks of the built-in `shapes` task (the generated task folder's utils.py imports these)."""
from __future__ import annotations

from harness.benchmarks import shapes


def doc_to_visual(doc) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict:
    prediction = results[0] if results else ""
    return {"exact_match": shapes.score(prediction, doc["answer"])}
