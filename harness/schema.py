"""Typed schemas of what the results store keeps, checked whenever a file is read (pydantic).

A record is trusted only if it has the shape its readers rely on *and* belongs to its key: the key is
the hash of the record's own `cell` identity, so a record copied or edited under another key is refused.
Partial-answer lines are checked one by one; a bad line is dropped (that sample is evaluated again).
JSON is read strictly: `NaN`/`Infinity` are not JSON and make a file invalid.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator)

KEY_PATTERN = r"^[0-9a-f]{16}$"


class SchemaError(ValueError):
    """A stored file that does not have the expected shape; the message is one line."""


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN/Infinity."""
    return json.loads(text, parse_constant=_reject_constant)


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
    if rec["status"] == "complete" and rec["n_samples"] != len(rec["samples"]):
        raise SchemaError(f"n_samples={rec['n_samples']} but {len(rec['samples'])} samples stored")
    return rec


class PartialRow(BaseModel):
    """One answered sample of a cell in progress."""
    model_config = ConfigDict(extra="forbid", strict=True)
    task: StrictStr
    split: StrictStr
    doc_id: Annotated[StrictInt, Field(ge=0)]
    answer: StrictStr
    nonfinite: StrictBool = False
    recall: list[float] | None = None  # per-layer asked-cell recall (`shapes`), when it was measured


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
