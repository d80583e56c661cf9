"""The inputs of a check: a version's input example, or a reference data set decoded to a signature.

A data set is a CSV (``.csv``), Parquet (``.parquet``, ``.pq``) or JSON lines (``.jsonl``, ``.ndjson``)
file, one row per row of inputs, with an optional label column (``--label``). It is decoded as a request
is:

- a DataFrame (column) signature: its columns through ``service.columns.decode_inputs``, as a request's
  table (columns the signature lacks, an id for example, are left out and listed in the report);
- a tensor signature: a column named after each input holding that row's tensor (a nested list, as JSON
  lines or Parquet carry an image), or, for a model of one input, every column but the label in file
  order as the row's values (64 columns for a ``[-1, 64]`` input), each then checked by
  ``service.signature`` as a request's tensor is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import columns, signature
from service.errors import FerryError, InvalidInput
from service.runtime.base import TensorSpec

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DataError(FerryError):
    """A data set that cannot be read, or does not fit the model's signature."""


@dataclass(slots=True)
class Inputs:
    """Decoded inputs of one version: arrays sharing their rows."""

    arrays: dict[str, np.ndarray]
    rows: int
    ignored: list[str] = field(default_factory=list)
    """Columns of the data set the signature does not take."""

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``index`` (any length: rows repeat to fill a batch larger than the data)."""
        return {name: np.ascontiguousarray(np.take(a, index, axis=0)) for name, a in self.arrays.items()}


def read_table(path: str | Path) -> Any:
    """The data set as a pandas DataFrame."""
    import pandas as pd

    file = Path(path)
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise DataError(
            f"data file {file}: give a .csv, .parquet or .jsonl file (got {file.suffix or 'no suffix'!r})"
        )
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    try:
        if kind == "csv":
            frame = pd.read_csv(file)
        elif kind == "parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_json(file, lines=True)
    except Exception as exc:  # pandas' and pyarrow's parser errors have no common base
        raise DataError(
            f"data file {file}: cannot be read as {kind}: {' '.join(str(exc).split())[:300]}"
        ) from None
    if frame.empty:
        raise DataError(f"data file {file} has no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def split_labels(frame: Any, label: str | None, source: str) -> tuple[Any, np.ndarray | None]:
    """The frame without its label column, and the labels (``None`` without ``label``)."""
    if label is None:
        return frame, None
    if label not in frame.columns:
        raise DataError(f"{source} has no label column {label!r}; its columns: {list(frame.columns)}")
    labels = frame[label].to_numpy()
    if frame[label].isna().any():
        raise DataError(f"{source}: label column {label!r} has empty cells")
    return frame.drop(columns=[label]), labels


def decode_frame(specs: Sequence[TensorSpec], frame: Any, source: str) -> Inputs:
    """A data set's rows decoded to a version's signature (see the module docstring)."""
    try:
        if not specs or columns.is_table(specs):
            table = {c: _cells(frame[c], as_list=not specs) for c in frame.columns}
            arrays, rows = columns.decode_inputs(specs, table, unknown="ignore")
            known = {s.name for s in specs}
            ignored = [c for c in frame.columns if specs and c not in known]
            return Inputs(arrays, rows, ignored)
        if all(s.name in frame.columns for s in specs):
            raw = {s.name: _stacked(s, frame[s.name]) for s in specs}
            arrays, rows = signature.decode_inputs(specs, raw)
            return Inputs(arrays, rows, [c for c in frame.columns if c not in raw])
        if len(specs) == 1:
            spec = specs[0]
            per_row = math.prod(d for d in spec.shape[1:])
            if any(d < 0 for d in spec.shape[1:]) or frame.shape[1] != per_row:
                raise DataError(
                    f"{source}: input {spec.name!r} takes rows of shape {signature.shape_text(spec.shape)}; "
                    f"give {per_row if per_row > 0 else 'its'} value columns (the data has "
                    f"{frame.shape[1]}: {_some(frame.columns)}) or a column {spec.name!r} holding each "
                    "row's tensor"
                )
            values = frame.to_numpy()
            if values.dtype.kind == "O":
                raise DataError(f"{source}: input {spec.name!r} takes numbers; some columns hold text")
            arrays, rows = signature.decode_inputs(
                specs, {spec.name: values.reshape(len(frame), *spec.shape[1:])}
            )
            return Inputs(arrays, rows)
        raise DataError(
            f"{source}: the model takes the inputs {[s.name for s in specs]}: give a column for each, "
            f"holding each row's tensor (the data has {_some(frame.columns)})"
        )
    except InvalidInput as exc:
        raise DataError(f"{source}: {exc.message}") from None


def example_inputs(specs: Sequence[TensorSpec], example: Mapping[str, np.ndarray] | None) -> Inputs | None:
    """A version's logged input example as its warm-up runs it: a tensor model's arrays in the
    signature's dtypes (zeros of the signature's shape when it logged none), a table's decoded
    columns; ``None`` for a table or a model without a signature that logged no example."""
    if example is None:
        if columns.is_table(specs) or not specs:
            return None
        example = {s.name: np.zeros(tuple(1 if d < 0 else d for d in s.shape), dtype=s.dtype) for s in specs}
    elif specs and not columns.is_table(specs):
        example = {s.name: np.ascontiguousarray(example[s.name], dtype=s.dtype) for s in specs}
    arrays = dict(example)
    return Inputs(arrays, signature.shared_rows(arrays))


def refit(specs: Sequence[TensorSpec], inputs: Inputs, source: str) -> Inputs:
    """Inputs decoded for one version, decoded for another one's signature (the compared version run on
    the candidate's example): refused when it takes other inputs."""
    try:
        if not specs:
            arrays, rows = columns.decode_inputs(specs, {k: v.tolist() for k, v in inputs.arrays.items()})
        elif columns.is_table(specs):
            arrays, rows = columns.decode_inputs(specs, dict(inputs.arrays), unknown="ignore")
        else:
            arrays, rows = signature.decode_inputs(specs, dict(inputs.arrays))
    except InvalidInput as exc:
        raise DataError(
            f"the compared version does not take {source}: {exc.message}; give a data set both take (--data)"
        ) from None
    return Inputs(arrays, rows)


def _cells(series: Any, as_list: bool = False) -> Any:
    """One column as ``columns.column_array`` takes it: numbers, booleans and date-times as their array;
    anything else (and anything for a model without a signature) as a list, with empty cells as nulls."""
    if series.dtype.kind in "biufM" and not as_list:
        return series.to_numpy()
    return [None if _missing(v) else v for v in series.tolist()]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _stacked(spec: TensorSpec, series: Any) -> np.ndarray:
    """A column holding one tensor per row as one array, rows first."""
    try:
        return np.stack([np.asarray(v) for v in series.tolist()])
    except ValueError:
        raise DataError(
            f"column {spec.name!r}: the rows' tensors have different shapes; the model takes "
            f"{signature.shape_text(spec.shape)}"
        ) from None


def _some(names: Sequence[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 8 else f"{names[:8]} and {len(names) - 8} more"
