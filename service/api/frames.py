"""MLflow scoring payloads to a model's tensor inputs, without pandas (it costs milliseconds per row).

A JSON body holds exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``;
a ``text/csv`` body is a table whose first line is a header when a non-empty field is not a number.
Tables map to tensor inputs the way MLflow maps a DataFrame to a tensor signature: columns named after
the inputs feed those inputs, and a single-input model takes the whole table as its rows. The result is
what ``service.columns.decode_inputs`` takes: rows, or ``{input_name: rows}``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.jsonbody import parse_object
from service.columns import is_table
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
            if is_table(specs) or not specs:
                return value
            columns = list(value[0])
            return {c: [_cell(row, c, f"instances[{i}]") for i, row in enumerate(value)] for c in columns}
        return value
    if key == "dataframe_records":
        return _records(specs, value)
    return _split(specs, value)


def _records(specs: Sequence[TensorSpec], value: Any) -> Any:
    if not isinstance(value, list) or not value or not all(isinstance(row, dict) for row in value):
        raise InvalidInput("dataframe_records must be a non-empty list of records (objects)")
    if is_table(specs) or not specs:  # a record may leave a column out: null there, as in pandas
        return value
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
    """A table to the model's inputs: for a DataFrame signature (or none) ``{column: cells}`` (rows in
    column order without a header); otherwise columns named after every input feed those inputs (a
    column of scalars fills an input of shape [-1, 1]), or a single-input model takes the rows as they are."""
    if is_table(specs) or not specs:
        if columns is None:
            return rows
        if len(set(columns)) != len(columns):
            raise InvalidInput(f"the table names a column twice: {columns}")
        if isinstance(rows, np.ndarray):
            return {str(c): rows[:, j] for j, c in enumerate(columns)}
        return {str(c): [row[j] for row in rows] for j, c in enumerate(columns)}
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
    """A ``text/csv`` body to the model's inputs. A DataFrame signature's columns are read by their types
    (an empty field is null, as pandas reads it); a tensor input's cells become integers when they all
    are, else floats."""
    header, lines = _csv_table(body)
    if is_table(specs) or not specs:
        if header is None and not specs:
            return _numbers(lines)
        if header is None:  # the signature's columns, in order
            if len(lines[0]) != len(specs):
                raise InvalidInput(
                    f"CSV rows have {len(lines[0])} fields and no header; the model takes {len(specs)} "
                    f"columns {[s.name for s in specs]}: add a header line naming them"
                )
            columns: dict[str, list[str]] = {s.name: [line[j] for line in lines] for j, s in enumerate(specs)}
        else:
            columns = {name: [line[j] for line in lines] for j, name in enumerate(header)}
        kinds = {s.name: s.column for s in specs}
        return {name: _csv_cells(cells, kinds.get(name)) for name, cells in columns.items()}
    picked = _table(specs, header, lines)
    if isinstance(picked, dict):
        return {name: _numbers(column) for name, column in picked.items()}
    return _numbers(picked)


def _csv_table(body: bytes) -> tuple[list[str] | None, list[list[str]]]:
    """A CSV body to (header or None, rows of fields); the first line is a header when one of its
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
    return header, data


_TRUE, _FALSE = frozenset({"true", "True", "TRUE"}), frozenset({"false", "False", "FALSE"})


def _csv_cells(cells: list[str], kind: str | None) -> list[Any]:
    """One CSV column's fields as the values of its type (``column_array`` checks them): numbers, booleans,
    or the text itself; an empty field is null."""
    if kind in ("string", "binary", "datetime"):
        return [c if c else None for c in cells]
    if kind == "boolean":
        return [True if c in _TRUE else False if c in _FALSE else (c or None) for c in cells]
    out: list[Any] = []
    for c in cells:
        if not c:
            out.append(None)
            continue
        try:
            out.append(int(c))
        except ValueError:
            try:
                out.append(float(c))
            except ValueError:
                out.append(c)  # refused by the column's type, naming the column (or a string column)
    return out


def _numbers(cells: Any) -> np.ndarray:
    """Fields (a column, or rows of them) as int64 when they all are integers, else float64; numpy
    parses each field in place (no fixed-width string array sized by the longest field)."""
    try:
        return np.array(cells, dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        numbers = np.array(cells, dtype=np.float64)
    except ValueError:
        flat = cells if cells and not isinstance(cells[0], list) else [f for line in cells for f in line]
        bad = next(field for field in flat if not _number(field))
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
