"""Layer calibration: ShortV's Layer Contribution, RedundancyLens' greedy Layer Ranking, and a cache of
calibration artefacts.

* `layer_contribution(model, adapter, batches, kind)`: for each LLM layer `i`, the KL divergence
  `KL(P_i || P)` between the next-token distribution at the last prompt position of the model whose layer
  `i` leaves the visual (or text) rows unchanged ("simulation mode": run the dense layer, reset those rows
  to the layer input) and that of the unmodified model; natural log, full vocabulary, fp32, averaged over
  samples (ShortV, spec A5). Lower = less effective layer. `rank_layers` sorts ascending.
* `greedy_layer_ranking(num_layers, evaluate, ...)`: RedundancyLens' greedy search (spec B4): the last
  `tail` layers pre-assigned in descending order, then each round adds the layer whose reduction (on top
  of the already ranked ones) degrades the validation objective least, `g = mean_d(D_d if D_d >= 0 else
  alpha * D_d)` with `D_d` the relative change of metric `d` against the unreduced model.
* `load_or_compute(key_parts, compute_fn, cache_dir)`: JSON artefacts keyed by a sha256 of the key parts
  (model id + config hash, data id, sample count, seed, method, kind), written atomically, reused on the
  next call.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from methods.base import MethodError

KINDS = ("visual", "text")


# ---- sampling -----------------------------------------------------------------------------------------
def select_samples(n_total: int, n: int, seed: int) -> list[int]:
    """`n` distinct indices out of `range(n_total)`, deterministic in `seed` (sorted)."""
    if n_total <= 0 or n <= 0:
        raise MethodError("calibration set is empty (no samples to draw from)")
    if n > n_total:
        raise MethodError(f"calibration asks for {n} samples but the data set has only {n_total}")
    return sorted(random.Random(seed).sample(range(n_total), n))


# ---- Layer Contribution (ShortV) ---------------------------------------------------------------------
def _model_inputs(batch: Mapping[str, Any], adapter=None) -> dict[str, Any]:
    inputs = dict(batch)
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not bool(mask[:, -1].all()):
            raise MethodError("calibration batches must be left-padded (last position must be a real token)")
        # M-RoPE models (Qwen2-VL) compute their 3-D positions from the ids and the padding mask themselves;
        # 1-D positions given here would replace them
        mrope = adapter is not None and getattr(adapter, "position_streams", 1) > 1
        if "position_ids" not in inputs and not bool(mask.all()) and not mrope:
            # the positions `generate` uses with left padding
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


@torch.no_grad()
def _last_logprobs(model, inputs) -> torch.Tensor:
    logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def layer_contribution(model, adapter, batches: Iterable[Mapping[str, Any]], kind: str = "visual") -> list[float]:
    """Per-layer Layer Contribution `LC_i = mean_samples KL(P_i || P)` (see module docstring).

    `batches`: model-input dicts (`input_ids`, `attention_mask`, `pixel_values`, ...; left padding).
    The model must be unpatched (no method applied). Deterministic for fixed inputs.
    """
    from methods._shared.context import install_context
    from methods._shared.reduced_layer import _ORIGINAL, patch_simulation, unpatch_layer

    if kind not in KINDS:
        raise MethodError(f"layer_contribution: kind must be one of {KINDS}, got {kind!r}")
    batches = list(batches)
    if not batches:
        raise MethodError("calibration set is empty (no batches given)")
    layers = adapter.llm_layers
    if any(hasattr(layer, _ORIGINAL) for layer in layers):
        raise MethodError("layer_contribution needs an unpatched model (a method is already applied)")
    ctx = install_context(model, adapter)
    if kind == "visual":
        def rows(c):
            return c.visual_mask
    else:
        def rows(c):
            return ~c.visual_mask

    totals = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = _model_inputs(batch, adapter)
            logp = _last_logprobs(model, inputs)
            n += logp.shape[0]
            for i, layer in enumerate(layers):
                patch_simulation(layer, ctx, rows)
                try:
                    logq = _last_logprobs(model, inputs)
                finally:
                    unpatch_layer(layer)
                kl = (logq.exp() * (logq - logp)).sum(-1)  # KL(P_ablated || P_original), per sample
                totals[i] += kl.double().sum()
    finally:
        model.train(was_training)
    if n == 0:
        raise MethodError("calibration set is empty (batches hold no samples)")
    return (totals / n).tolist()


def rank_layers(scores: list[float]) -> list[int]:
    """Layer indices by ascending score (ties: lower index first): the full permutation."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


# ---- greedy Layer Ranking (RedundancyLens) -------------------------------------------------------------
def ranking_objective(scores: Mapping[str, float], base: Mapping[str, float], alpha: float = 2.0) -> float:
    """`mean_d(D_d if D_d >= 0 else alpha * D_d)`, `D_d = (s_d - b_d) / |b_d|` (absolute change if b_d = 0)."""
    if not base:
        raise MethodError("ranking objective: no validation metrics")
    vals = []
    for d, b in base.items():
        s = float(scores[d])
        delta = (s - b) / abs(b) if b != 0 else s - b
        vals.append(delta if delta >= 0 else alpha * delta)
    return sum(vals) / len(vals)


def greedy_layer_ranking(
    num_layers: int,
    evaluate: Callable[[list[int]], Mapping[str, float]],
    *,
    tail: int = 0,
    alpha: float = 2.0,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Greedy priority order of layers for one reduction type (spec B4).

    `evaluate(layers)` returns validation metrics (higher = better) with the reduction applied to
    `layers`. The last `tail` layers are pre-assigned (descending); each round adds the candidate with the
    best objective (ties: deeper layer); after `stop_at` ranked layers the rest is appended in descending
    order. Returns {"ranking", "rounds": [{"layer", "objective"}], "base"}.
    """
    if not 0 <= tail <= num_layers:
        raise MethodError(f"greedy ranking: tail={tail} out of range [0, {num_layers}]")
    base = dict(evaluate([]))
    ranked = list(range(num_layers - 1, num_layers - 1 - tail, -1))
    remaining = [i for i in range(num_layers) if i not in ranked]
    rounds = []
    while remaining and (stop_at is None or len(ranked) < stop_at):
        best = None
        for c in sorted(remaining, reverse=True):  # deeper first: strict '>' keeps the deeper on ties
            g = ranking_objective(evaluate(ranked + [c]), base, alpha)
            if best is None or g > best[0]:
                best = (g, c)
        ranked.append(best[1])
        remaining.remove(best[1])
        rounds.append({"layer": best[1], "objective": best[0]})
    ranked += sorted(remaining, reverse=True)
    return {"ranking": ranked, "rounds": rounds, "base": base}


# ---- artefact cache --------------------------------------------------------------------------------------
def config_hash(config) -> str:
    """sha256 of a transformers config (architecture only: name/path and version fields dropped)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for k in ("_name_or_path", "transformers_version"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def artefact_key(key_parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(key_parts), sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def artefact_path(key_parts: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    key = artefact_key(key_parts)
    stem = "-".join(str(key_parts[k]) for k in ("method", "kind") if k in key_parts) or "calibration"
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
    return Path(cache_dir) / f"{stem}-{key[:16]}.json"


def load_or_compute(
    key_parts: Mapping[str, Any], compute_fn: Callable[[], Mapping[str, Any]], cache_dir: str | os.PathLike
) -> dict[str, Any]:
    """Return the artefact for `key_parts` from `cache_dir`, computing (and atomically writing) it first
    if absent. `compute_fn()` returns a dict with at least "ranking" (full permutation) and "scores".
    The returned dict adds "key", "key_parts" and "path"."""
    key = artefact_key(key_parts)
    path = artefact_path(key_parts, cache_dir)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and data.get("key") == key:
            data["path"] = str(path)
            return data
    result = dict(compute_fn())
    missing = [k for k in ("ranking", "scores") if k not in result]
    if missing:
        raise MethodError(f"calibration result lacks {', '.join(missing)}")
    record = {"key": key, "key_parts": dict(key_parts), **result}
    _atomic_write_json(path, record)
    record["path"] = str(path)
    return record


def layer_contribution_artefact(
    model,
    adapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    model_id: str,
    data_id: str,
    n_samples: int,
    seed: int,
    cache_dir: str | os.PathLike,
    kind: str = "visual",
    method: str = "shortv",
) -> dict[str, Any]:
    """Cached Layer Contribution: {"ranking", "scores", "key", "key_parts", "path"}. `batches` is only
    consumed when the artefact is not cached yet."""
    key_parts = {
        "model_id": model_id,
        "config_hash": config_hash(model.config),
        "data_id": data_id,
        "n_samples": int(n_samples),
        "seed": int(seed),
        "method": method,
        "kind": kind,
    }

    def compute():
        scores = layer_contribution(model, adapter, batches, kind=kind)
        return {"scores": scores, "ranking": rank_layers(scores)}

    return load_or_compute(key_parts, compute, cache_dir)
