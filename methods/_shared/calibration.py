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
* `load_or_compute(key_parts, compute_fn, cache_dir)`: sealed JSON artefacts keyed by a sha256 of the key
  parts (model id + config hash, data id, sample count, seed, method, kind), written atomically, reused on
  the next call if valid (`read_artefact`: seal, key, ranking a permutation consistent with the scores);
  an invalid one is named in one warning line and computed again. Processes that need one artefact at
  once wait for one computation (a file lock beside it).
* `reused_image_features(model, adapter)`: both calibrations change LLM layers only and run the same
  batches many times (ShortV: 1 + L forwards per batch, RedundancyLens: one per greedy candidate), so
  within the block the image encoder runs once per batch and its output is reused (exact: same input,
  same encoder, same result).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
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


# ---- the image encoder once per batch ----------------------------------------------------------------
@contextlib.contextmanager
def reused_image_features(model, adapter):
    """Within the block, `get_image_features` of the model computes once per distinct input (the same
    tensor objects, unmodified, and the same other arguments) and returns that result afterwards. Only
    for runs that leave the image encoder and projector untouched (the calibrations ablate LLM layers).
    The inputs are held for the block's lifetime, so their ids cannot be reused by other tensors."""
    from methods._shared.context import install_context

    base = adapter.base
    if getattr(base, "get_image_features", None) is None:
        yield
        return
    install_context(model, adapter)  # the visual context's own wrapper stays below this cache
    had = "get_image_features" in vars(base)
    previous = vars(base).get("get_image_features")
    encode = base.get_image_features
    memo: dict = {}
    active = [True]

    def key_of(v):
        if isinstance(v, torch.Tensor):
            try:
                version = v._version
            except RuntimeError:  # an inference tensor has no version counter
                version = None
            return ("tensor", id(v), version)
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(key_of(x) for x in v))
        return ("value", repr(v))

    @functools.wraps(encode)
    def cached(*args, **kwargs):
        if not active[0]:
            return encode(*args, **kwargs)
        key = (key_of(args), tuple(sorted((k, key_of(v)) for k, v in kwargs.items())))
        if key not in memo:
            memo[key] = ((args, kwargs), encode(*args, **kwargs))  # the inputs kept alive with the key
        return memo[key][1]

    base.get_image_features = cached
    try:
        yield
    finally:
        active[0] = False
        memo.clear()
        if vars(base).get("get_image_features") is cached:
            if had:
                base.get_image_features = previous
            else:
                del base.get_image_features


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
        with reused_image_features(model, adapter):  # the image encoder once per batch, not 1 + L times
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
    """Write `data` as sealed JSON (`harness.schema.dumps_sealed`), atomically."""
    from harness.schema import dumps_sealed

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps_sealed(data, indent=1, sort_keys=True))
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


class ArtefactError(MethodError):
    """A calibration artefact that is not valid; the message is the one-line reason."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_artefact(data: Any, *, key_parts: Mapping[str, Any] | None = None, num_layers: int | None = None) -> dict:
    """`data` (an unsealed artefact) if it agrees with itself, with the key parts asked for and with a model
    of `num_layers` LLM layers; raise ArtefactError (one line) otherwise.

    The key is the hash of its key parts; the ranking is a permutation of the layers; scores are finite.
    ShortV (method 'shortv'): one Layer Contribution per layer, and the ranking is `rank_layers(scores)`
    (ascending LC, ties: lower index). RedundancyLens: the rounds' layers follow the `tail` pre-assigned
    layers (descending from the last) in the ranking, their objectives and the base metrics are finite."""
    if not isinstance(data, dict):
        raise ArtefactError(f"not a calibration artefact (a JSON {type(data).__name__})")
    missing = [k for k in ("key", "key_parts", "ranking", "scores") if k not in data]
    if missing:
        raise ArtefactError(f"lacks {', '.join(missing)}")
    parts = data["key_parts"]
    if not isinstance(parts, dict) or data["key"] != artefact_key(parts):
        raise ArtefactError("its key is not the hash of its key_parts")
    if key_parts is not None and data["key"] != artefact_key(key_parts):
        raise ArtefactError("it was computed for other settings (its key_parts differ from the ones asked for)")
    ranking = data["ranking"]
    if not isinstance(ranking, list) or not all(_is_int(i) for i in ranking):
        raise ArtefactError(f"ranking is not a list of layer indices: {str(ranking)[:60]}")
    n = len(ranking) if num_layers is None else int(num_layers)
    if sorted(ranking) != list(range(n)):
        raise ArtefactError(f"ranking is not a permutation of the {n} layers: {str(ranking)[:60]}")
    scores = data["scores"]
    if not isinstance(scores, list):
        raise ArtefactError("scores is not a list")
    if parts.get("method") == "shortv":
        if len(scores) != n or not all(_is_finite(x) for x in scores):
            raise ArtefactError(f"scores are not {n} finite Layer Contributions")
        if ranking != rank_layers(scores):
            raise ArtefactError("ranking does not follow its scores (ascending Layer Contribution, ties: lower layer)")
    elif parts.get("method") == "redundancylens":
        tail = parts.get("tail", 0)
        if not _is_int(tail) or not 0 <= tail <= n:
            raise ArtefactError(f"key_parts.tail={tail!r} is out of range")
        if ranking[:tail] != list(range(n - 1, n - 1 - tail, -1)):
            raise ArtefactError(f"ranking does not start with the {tail} pre-assigned last layers")
        if not all(isinstance(r, dict) and _is_int(r.get("layer")) and _is_finite(r.get("objective")) for r in scores):
            raise ArtefactError("scores are not rounds of a layer and a finite objective")
        if [r["layer"] for r in scores] != ranking[tail : tail + len(scores)]:
            raise ArtefactError("the rounds' layers are not the ranking's (after the pre-assigned tail)")
        base = data.get("base")
        if not isinstance(base, dict) or not base or not all(_is_finite(v) for v in base.values()):
            raise ArtefactError("base metrics are missing or not finite")
    elif not all(_is_finite(x) for x in _flat_numbers(scores)):
        raise ArtefactError("scores are not finite")
    return data


def _flat_numbers(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flat_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flat_numbers(v)
    elif obj is not None and not isinstance(obj, str):
        yield obj


def read_artefact(path: str | os.PathLike, *, key_parts: Mapping[str, Any] | None = None,
                  num_layers: int | None = None) -> dict:
    """A calibration artefact file, validated: sealed JSON (`harness.schema.loads_sealed`) that passes
    `check_artefact`. Raises ArtefactError (one line) for a missing, unreadable, truncated, unsealed,
    edited or inconsistent file. The returned dict adds "path"."""
    from harness.schema import SchemaError, loads_sealed

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ArtefactError(f"unreadable: {e.strerror or e}") from None
    try:
        data = loads_sealed(raw)
    except SchemaError as e:
        raise ArtefactError(str(e)) from None
    check_artefact(data, key_parts=key_parts, num_layers=num_layers)
    data["path"] = str(path)
    return data


def load_or_compute(
    key_parts: Mapping[str, Any], compute_fn: Callable[[], Mapping[str, Any]], cache_dir: str | os.PathLike,
    num_layers: int | None = None,
) -> dict[str, Any]:
    """Return the artefact for `key_parts` from `cache_dir`, computing (and atomically writing) it first
    if absent. `compute_fn()` returns a dict with at least "ranking" (full permutation) and "scores".
    The returned dict adds "key", "key_parts" and "path". A cached file that is not valid (`read_artefact`:
    truncated, unsealed, edited, inconsistent) is named in one warning line and computed again."""
    key = artefact_key(key_parts)
    path = artefact_path(key_parts, cache_dir)
    # one computation per artefact: processes that need it at once (a parallel sweep's workers) wait for
    # the first one and then read its file
    with _artefact_lock(path):
        return _load_or_compute(key, key_parts, path, compute_fn, num_layers)


def _artefact_lock(path: Path):
    """An OS file lock (`filelock`: flock on Unix, released by the kernel when its holder dies) beside the
    artefact; none where the folder cannot hold one (artefacts read from a read-only folder)."""
    import contextlib
    import sys

    from filelock import FileLock, Timeout

    lock_path = path.with_name(f".{path.name}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, is_singleton=False, fallback_to_soft=False, preserve_lock_file=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            from harness.execution import idle

            print(f"[vtbench] calibration artefact {path.name} is being computed by another process: waiting for it",
                  file=sys.stderr, flush=True)
            with idle():  # the device is not computed on meanwhile: a timing part need not wait for this wait
                lock.acquire()
    except OSError:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        try:
            yield
        finally:
            lock.release()

    return held()


def _load_or_compute(key, key_parts, path, compute_fn, num_layers):
    import sys

    if path.exists():
        try:
            return read_artefact(path, key_parts=key_parts, num_layers=num_layers)
        except ArtefactError as e:
            print(f"[vtbench] warning: invalid calibration artefact {path} ({e}); computing it again",
                  file=sys.stderr, flush=True)
    result = dict(compute_fn())
    missing = [k for k in ("ranking", "scores") if k not in result]
    if missing:
        raise MethodError(f"calibration result lacks {', '.join(missing)}")
    record = {"key": key, "key_parts": dict(key_parts), **result}
    check_artefact(json.loads(json.dumps(record, default=str)), key_parts=key_parts, num_layers=num_layers)
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

    return load_or_compute(key_parts, compute, cache_dir, num_layers=len(adapter.llm_layers))
