"""Typed schemas of what the results store keeps, checked whenever a file is read (pydantic).

A record is trusted only if it has the shape its readers rely on *and* belongs to its key: the key is
the hash of the record's own `cell` identity, so a record copied or edited under another key is refused.
Partial-answer lines are checked one by one; a bad line is dropped (that sample is evaluated again).
JSON is read strictly: `NaN`/`Infinity` are not JSON and make a file invalid.

Sealed JSON (`dumps_sealed` / `loads_sealed`): the one format of every stored file that vtbench serves
again (records, calibration artefacts, FLOPs-count cache entries). Writing adds `SEAL_FIELD`, the sha256 of
the canonical JSON (sorted keys, no spaces) of everything else; reading requires strict JSON (no
NaN/Infinity, no duplicate keys at any depth) and a matching seal. A file without a seal, or with a wrong
one (hand-edited, truncated, written by earlier code), is invalid. The seal catches edits; the readers'
semantic checks (`validate_record`, `methods._shared.calibration.check_artefact`) catch a file that was
edited and sealed again but does not agree with itself.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator)

KEY_PATTERN = r"^[0-9a-f]{16}$"

#: the format number of a record file (`schema` at its top; 2 = sealed). The cell identity's own `schema`
#: (harness.results.SCHEMA) is part of the key and is a different number.
RECORD_SCHEMA = 2


class SchemaError(ValueError):
    """A stored file that does not have the expected shape; the message is one line."""


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN/Infinity."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text} is not finite")
    return x


#: the field that holds a sealed file's content digest
SEAL_FIELD = "content_sha256"


def canonical_json(obj: Any) -> str:
    """The canonical text a seal is computed on: sorted keys, no spaces, strict."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def content_digest(obj: dict) -> str:
    """sha256 of the canonical JSON of `obj` without its seal."""
    return hashlib.sha256(canonical_json({k: v for k, v in obj.items() if k != SEAL_FIELD}).encode()).hexdigest()


def seal(obj: dict) -> dict:
    """`obj` as JSON will store it (non-finite floats -> None, tuples -> lists), with its seal added."""
    data = json.loads(dumps_strict(obj))
    if not isinstance(data, dict):
        raise TypeError("only a JSON object can be sealed")
    data.pop(SEAL_FIELD, None)
    data[SEAL_FIELD] = content_digest(data)
    return data


def dumps_sealed(obj: dict, **kw) -> str:
    """The JSON text of `obj` with its seal (`kw` as for `json.dumps`, e.g. indent)."""
    return json.dumps(seal(obj), allow_nan=False, **kw)


def loads_json_strict(text: str | bytes) -> Any:
    """Strict JSON: no NaN/Infinity (nor a number that overflows to it), no duplicate keys at any depth.
    Raises SchemaError (one line)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_reject_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(f"not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def loads_sealed(text: str | bytes) -> dict:
    """A sealed JSON object (seal removed); raises SchemaError (one line) for invalid JSON, a missing seal
    or one that does not match the content."""
    data = loads_json_strict(text)
    if not isinstance(data, dict):
        raise SchemaError(f"not a JSON object (a JSON {type(data).__name__})")
    digest = data.pop(SEAL_FIELD, None)
    if digest is None:
        raise SchemaError(f"no {SEAL_FIELD} seal (written by earlier vtbench code, or not by vtbench)")
    if not isinstance(digest, str) or digest != content_digest(data):
        raise SchemaError(f"{SEAL_FIELD} does not match the content (the file was edited)")
    return data


def finite(obj: Any) -> Any:
    """A copy with every non-finite float replaced by None (so the JSON written is standard)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kw) -> str:
    return json.dumps(finite(obj), allow_nan=False, default=str, **kw)


def identity_hash(identity: dict) -> str:
    """The record key of a cell identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


_Open = ConfigDict(extra="allow", strict=True)


class _ModelId(BaseModel):
    model_config = _Open
    name: StrictStr
    pretrained: StrictStr


class _MethodId(BaseModel):
    model_config = _Open
    name: StrictStr
    params: dict[str, Any]


class _BenchId(BaseModel):
    model_config = _Open
    name: StrictStr
    task: StrictStr


class Cell(BaseModel):
    model_config = _Open
    model: _ModelId
    method: _MethodId
    benchmark: _BenchId
    limit: StrictInt | None
    seed: StrictInt
    batch_size: StrictInt


class Sample(BaseModel):
    model_config = _Open
    doc_id: StrictInt
    target: StrictStr
    prediction: StrictStr


class _RecordBase(BaseModel):
    model_config = _Open
    key: Annotated[StrictStr, Field(pattern=KEY_PATTERN)]
    cell: Cell
    config: dict[str, Any]
    created: StrictStr


Number = Union[StrictInt, float]


class CompleteRecord(_RecordBase):
    status: Literal["complete"]
    primary_metric: StrictStr
    accuracy: Number | None
    metrics: dict[str, Number | None]
    n_samples: Annotated[StrictInt, Field(ge=0)]
    n_failed: Annotated[StrictInt, Field(ge=0)]
    n_empty: Annotated[StrictInt, Field(ge=0)]
    samples: list[Sample]
    method_params: dict[str, Any]
    efficiency: dict[str, Any] | None = None
    failures: dict[str, StrictStr] = {}

    @field_validator("accuracy")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("accuracy is not finite")
        return v


class FailedRecord(_RecordBase):
    status: Literal["failed"]
    error: StrictStr


_RECORD = TypeAdapter(Annotated[Union[CompleteRecord, FailedRecord], Field(discriminator="status")])


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and x in ("complete", "failed")))
    return f"{where or 'record'}: {err.get('msg')}" + (f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else "")


def validate_record(rec: Any, key: str | None = None) -> dict:
    """Return `rec` unchanged if it is a well-formed record of `key`; raise SchemaError (one line)."""
    if not isinstance(rec, dict):
        raise SchemaError(f"not a vtbench record (a JSON {type(rec).__name__})")
    try:
        _RECORD.validate_python(rec)
    except ValidationError as e:
        raise SchemaError(f"not a valid vtbench record: {_first_error(e)}") from None
    if key is not None and rec["key"] != key:
        raise SchemaError(f"record key {rec['key']!r} does not match its file name ({key})")
    if identity_hash(rec["cell"]) != rec["key"]:
        raise SchemaError("record key is not the hash of its cell identity (edited or copied under another key)")
    why = _inconsistency(rec)
    if why:
        raise SchemaError(why)
    return rec


_TOL = 1e-9


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _TOL * max(1.0, abs(a), abs(b))


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _inconsistency(rec: dict) -> str | None:
    """Why a well-typed record does not agree with itself (None if it does)."""
    if rec.get("schema") != RECORD_SCHEMA:
        return f"schema={rec.get('schema')!r}, this vtbench reads schema {RECORD_SCHEMA}"
    run = rec["config"].get("run")
    if isinstance(run, dict) and "limit" in run and run["limit"] != rec["cell"]["limit"]:
        return f"config.run.limit={run['limit']!r} contradicts cell.limit={rec['cell']['limit']!r}"
    if rec["status"] != "complete":
        return None
    n, samples, primary = rec["n_samples"], rec["samples"], rec["primary_metric"]
    if n != len(samples):
        return f"n_samples={n} but {len(samples)} samples stored"
    limit = rec["cell"]["limit"]
    if limit is not None and n > limit:
        return f"n_samples={n} exceeds cell.limit={limit}"
    for field in ("n_failed", "n_empty", "n_nonfinite"):
        v = rec.get(field)
        if v is None and field == "n_nonfinite":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= n:
            return f"{field}={v!r} is not a count within [0, n_samples={n}]"
    if len(rec.get("failures") or {}) != rec["n_failed"]:
        return f"n_failed={rec['n_failed']} but {len(rec.get('failures') or {})} failures listed"
    if isinstance(rec.get("nonfinite"), list) and len(rec["nonfinite"]) != rec.get("n_nonfinite"):
        return f"n_nonfinite={rec.get('n_nonfinite')} but {len(rec['nonfinite'])} non-finite samples listed"
    ids = [s["doc_id"] for s in samples]
    if any(i < 0 for i in ids):
        return "a sample has a negative doc_id"
    if len(set(ids)) != len(ids):
        return f"duplicated doc_id(s) {sorted({i for i in ids if ids.count(i) > 1})[:5]}"
    metrics = rec["metrics"]
    if primary not in metrics:
        return f"primary_metric {primary!r} is not one of the record's metrics {sorted(metrics)}"
    acc, m = rec["accuracy"], metrics[primary]
    if (acc is None) != (m is None) or (acc is not None and not _close(acc, m)):
        return f"accuracy={acc!r} differs from metrics.{primary}={m!r}"
    for name, v in metrics.items():
        if v is not None and not math.isfinite(v):
            return f"metrics.{name} is not finite"
    per = [s.get(primary) for s in samples]
    if any(v is not None for v in per):  # the metric is a per-sample mean: the samples must give it
        if not all(_is_num(v) and math.isfinite(v) for v in per):
            return f"some samples lack a finite {primary}"
        if acc is None or not _close(acc, sum(per) / len(per)):
            return f"accuracy={acc!r} is not the mean {sum(per) / len(per)!r} of the samples' {primary}"
    return _efficiency_inconsistency(rec.get("efficiency"))


def _leaves(obj: Any, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _efficiency_inconsistency(eff: Any) -> str | None:
    """Counts, times and bytes are non-negative (a `*delta*` may not be); a FLOPs `total` is the sum of its
    components; a spread's median and quartiles lie within [min, max]; 'counted equals analytic' holds."""
    if eff is None:
        return None
    if not isinstance(eff, dict):
        return "efficiency is not an object"
    for path, v in _leaves(eff):
        if _is_num(v):
            if not math.isfinite(v):
                return f"efficiency.{path} is not finite"
            if v < 0 and "delta" not in path.rsplit(".", 1)[-1]:
                return f"efficiency.{path}={v!r} is negative"
    flops = eff.get("flops")
    mismatches = eff.get("mismatches")  # the runtime guard's lines (absent from older records)
    if mismatches is not None:
        if not isinstance(mismatches, list) or not all(isinstance(m, str) and m for m in mismatches):
            return "efficiency.mismatches is not a list of lines"
        if (isinstance(flops, dict) and flops.get("counted_equals_analytic") is False
                and flops.get("source") == "counted" and not any("FLOPs" in m for m in mismatches)):
            return "efficiency.flops: counted prefill FLOPs differ from the analytic ones but efficiency.mismatches does not say so"
    if isinstance(flops, dict):
        for name, block in flops.items():
            if isinstance(block, dict) and "total" in block:
                parts = [v for k, v in block.items() if k != "total"]
                if not parts:
                    return f"efficiency.flops.{name} has a total but no components"
                if not all(_is_num(v) or v is None for v in parts) or not (_is_num(block["total"]) or block["total"] is None):
                    return f"efficiency.flops.{name} has a non-numeric component"
                if block["total"] is not None and not _close(block["total"], sum(v or 0 for v in parts)):
                    return (f"efficiency.flops.{name}.total={block['total']!r} is not the sum of its components "
                            f"({sum(v or 0 for v in parts)!r})")
        if flops.get("counted_equals_analytic") is True:
            pre, ana = flops.get("prefill") or {}, flops.get("analytic_prefill") or {}
            if any(abs((pre.get(k) or 0) - (ana.get(k) or 0)) >= 0.5 for k in ana):
                return "efficiency.flops: counted prefill FLOPs differ from the analytic ones it claims to equal"
    for section in ("latency",):
        block = eff.get(section)
        if not isinstance(block, dict):
            continue
        for name, spread in block.items():
            if isinstance(spread, dict) and _is_num(spread.get("min")) and _is_num(spread.get("max")):
                lo, hi = spread["min"], spread["max"]
                for k in ("median", "q1", "q3"):
                    if _is_num(spread.get(k)) and not lo <= spread[k] <= hi:
                        return f"efficiency.{section}.{name}.{k}={spread[k]!r} is outside [min, max]"
    return None


class PartialRow(BaseModel):
    """One answered sample of a cell in progress."""
    model_config = ConfigDict(extra="forbid", strict=True)
    task: StrictStr
    split: StrictStr
    doc_id: Annotated[StrictInt, Field(ge=0)]
    answer: StrictStr
    nonfinite: StrictBool = False
    recall: list[float | None] | None = None  # per-layer asked-cell recall (`shapes`; None: a layer before the method acts)


class PartialHeader(BaseModel):
    """First line of a partial file: whose answers these are."""
    model_config = ConfigDict(extra="forbid", strict=True)
    vtbench_partial: Literal[1]
    key: Annotated[StrictStr, Field(pattern=KEY_PATTERN)]
    code: StrictStr


def parse_partial_line(line: bytes, model: type[BaseModel] = PartialRow) -> BaseModel | None:
    """A validated partial line, or None for anything undecodable or wrongly typed."""
    try:
        return model.model_validate(loads_strict(line.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, ValidationError):
        return None
