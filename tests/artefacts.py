"""Valid calibration artefacts for tests (sealed, as `methods._shared.calibration.load_or_compute` writes
them); methods refuse anything else."""
from __future__ import annotations

from pathlib import Path

from harness.schema import dumps_sealed
from methods._shared.calibration import artefact_key, rank_layers


def shortv_artefact(scores, *, kind="visual", **key_parts) -> dict:
    """A ShortV Layer Contribution artefact: the ranking follows the scores."""
    parts = {"model_id": "tiny", "config_hash": "0", "data_id": "shapes:val", "n_samples": 2, "seed": 0,
             "method": "shortv", "kind": kind, **key_parts}
    return {"key": artefact_key(parts), "key_parts": parts, "scores": list(scores), "ranking": rank_layers(list(scores))}


def redundancylens_artefact(ranking, *, kind="ffn", tail=0, rounds=None, **key_parts) -> dict:
    """A RedundancyLens ranking artefact: `tail` pre-assigned last layers, then one round per layer."""
    parts = {"model_id": "tiny", "config_hash": "0", "data_id": "shapes:val", "n_samples": 2, "seed": 0,
             "method": "redundancylens", "kind": kind, "params": {}, "tail": tail, "alpha": 2.0, **key_parts}
    rounds = [{"layer": i, "objective": 1.0 - 0.1 * n} for n, i in enumerate(ranking[tail:])] if rounds is None else rounds
    return {"key": artefact_key(parts), "key_parts": parts, "ranking": list(ranking), "scores": rounds,
            "base": {"agreement": 1.0}}


def write_sealed(path: Path, data: dict) -> Path:
    path.write_text(dumps_sealed(data, indent=1, sort_keys=True))
    return path
