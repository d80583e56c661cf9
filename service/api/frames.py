"""MLflow scoring payloads to a model's tensor inputs, without pandas (it costs milliseconds per row).

A JSON body holds exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``;
a ``text/csv`` body is a table whose first line is a header when a non-empty field is not a number.
Tables map to tensor inputs the way MLflow maps a DataFrame to a tensor signature: columns named after
the inputs feed those inputs, and a single-input model takes the whole table as its rows. The result is
what ``service.signature.decode_inputs`` takes: rows, or ``{input_name: rows}``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.jsonbody import parse_object
from service.errors import BadRequest, InvalidInput
from service.runtime.base import TensorSpec

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def json_payload(body: bytes) -> dict[str, Any]:
    """The JSON body; numeric ``inputs`` and ``instances`` decoded straight to arrays (``jsonbody.py``)."""
    return parse_object(
        body, ("inputs", "instances"), expected=f"a JSON object with exactly one of {list(FORMATS)}"
    )


def payload_inputs(specs: Sequence[TensorSpec], payload: dict[str, Any]) -> Any:
    """The one data field of a JSON body, as ``decode_inputs`` takes it."""
    present = [key for key in FORMATS if key in payload]
    if len(present) != 1:
        raise BadRequest(
            f"the body must hold exactly one of {list(FORMATS)} (and optionally 'params'); "
            f"it holds {sorted(payload)}"
        )
    key = present[0]
    value = payload[key]
    if key == "inputs":  # TF-serving columns: rows, or {input: rows}
        return value
    if key == "instances":  # TF-serving rows: values, or one {input: value} per row
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = list(value[0])
            return {c: [_cell(row, c, f"instances[{i}]") for i, row in enumerate(value)] for c in columns}
        return value
    if key == "dataframe_records":
        return _records(specs, value)
    return _split(specs, value)


def _records(specs: Sequence[TensorSpec], value: Any) -> Any:
    if not isinstance(value, list) or not value or not all(isinstance(row, dict) for row in value):
        raise InvalidInput("dataframe_records must be a non-empty list of records (objects)")
    columns = list(value[0])
    if any(len(row) != len(columns) for row in value):
        raise InvalidInput(f"dataframe_records: every record must have the columns {columns}")
    rows = [[_cell(row, c, f"dataframe_records[{i}]") for c in columns] for i, row in enumerate(value)]
    return _table(specs, columns, rows)


def _split(specs: Sequence[TensorSpec], value: Any) -> Any:
    if not isinstance(value, dict) or "data" not in value or set(value) - {"columns", "data", "index"}:
        raise InvalidInput("dataframe_split must be an object with 'data' and optionally 'columns', 'index'")
    columns, rows = value.get("columns"), value["data"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise InvalidInput("dataframe_split: 'data' must be a list of rows (lists)")
    if columns is not None:
        if not isinstance(columns, list):
            raise InvalidInput("dataframe_split: 'columns' must be a list")
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise InvalidInput(
                    f"dataframe_split: row {i} has {len(row)} values for {len(columns)} columns"
                )
    return _table(specs, columns, rows)


def _cell(row: dict[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise InvalidInput(f"{where} lacks the column {column!r}")
    return row[column]


def _table(specs: Sequence[TensorSpec], columns: list[Any] | None, rows: Any) -> Any:
    """A table to the model's inputs: columns named after every input feed those inputs (a column of
    scalars fills an input of shape [-1, 1]); otherwise a single-input model takes the rows as they are."""
    names = [s.name for s in specs]
    if columns is not None and all(n in columns for n in names):
        picked: dict[str, Any] = {}
        for spec in specs:
            j = columns.index(spec.name)
            cells = rows[:, j] if isinstance(rows, np.ndarray) else [row[j] for row in rows]
            if len(spec.shape) == 2 and spec.shape[1] == 1 and np.ndim(cells[0] if len(cells) else 0) == 0:
                cells = np.asarray(cells).reshape(-1, 1)
            picked[spec.name] = cells
        return picked
    if len(specs) == 1:
        return rows
    raise InvalidInput(
        f"the table's columns {columns} do not name the model's inputs {names}", expected=names
    )


def csv_inputs(specs: Sequence[TensorSpec], body: bytes) -> Any:
    """A ``text/csv`` body to the model's inputs; each input's cells become integers when they all are."""
    header, cells = _csv_table(body)
    picked = _table(specs, header, cells)
    if isinstance(picked, dict):
        return {name: _numbers(column) for name, column in picked.items()}
    return _numbers(picked)


def _csv_table(body: bytes) -> tuple[list[str] | None, np.ndarray]:
    """A CSV body to (header or None, cells as strings); the first line is a header when one of its
    non-empty fields is not a number."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"CSV body is not UTF-8: {exc}") from None
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        lines = [line for line in reader if line]
    except csv.Error as exc:
        raise BadRequest(f"malformed CSV at line {reader.line_num}: {exc}") from None
    header = lines[0] if lines and any(f.strip() and not _number(f) for f in lines[0]) else None
    data = lines[1:] if header is not None else lines
    if not data:
        raise BadRequest("CSV body has no data rows")
    width = len(header) if header is not None else len(data[0])
    for i, line in enumerate(data):
        if len(line) != width:
            raise BadRequest(f"malformed CSV: data row {i + 1} has {len(line)} fields, expected {width}")
    return header, np.array(data, dtype=str)


def _numbers(cells: np.ndarray) -> np.ndarray:
    try:
        return cells.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        numbers = cells.astype(np.float64)
    except ValueError:
        bad = next(field for field in cells.ravel().tolist() if not _number(field))
        raise InvalidInput(f"CSV holds a value that is not a number: {bad!r}") from None
    if not np.isfinite(numbers).all():
        raise InvalidInput("CSV holds NaN or infinite values")
    return numbers


def _number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True
