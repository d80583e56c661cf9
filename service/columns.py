"""Tables: the columns of an MLflow DataFrame (column-based) signature, as Ferry carries them.

A column-based signature becomes one ``TensorSpec`` per column: shape ``(-1,)`` (one value per row),
``column`` the MLflow type and the numpy dtype pandas gives that type (``DTYPES``). A request's table is
then a dict of 1-D arrays like any other request: it batches by rows (columns concatenated, outputs split
back by rows), the cache keys it, and only the pyfunc runtime builds the pandas DataFrame, in signature
order, when the model runs.

Strings are numpy object arrays of ``str`` (references to the decoded values, so a long string costs its
own size once, never the longest string times the rows); binary columns hold ``bytes`` (base64 in JSON,
as MLflow's scoring server reads them); datetimes are ``datetime64[ns]``. Any other MLflow type (array,
object, map, ``Any``) passes through as an object array of the decoded JSON values.

``column_array`` checks one column's cells against its spec; ``columns_of`` turns the table forms a
client sends (records, columns, or rows in signature order) into ``{column: cells}``. Every refusal is an
``InvalidInput`` naming the column.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service import signature
from service.errors import InvalidInput, InvalidValue
from service.runtime.base import TensorSpec

DTYPES: dict[str, np.dtype[Any]] = {
    "boolean": np.dtype(np.bool_),
    "integer": np.dtype(np.int32),
    "long": np.dtype(np.int64),
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "string": np.dtype(object),
    "binary": np.dtype(object),
    "datetime": np.dtype("datetime64[ns]"),
}
"""MLflow's column types and the numpy dtype of the pandas column MLflow builds for each."""


def decode_inputs(
    specs: Sequence[TensorSpec], raw: Any, *, unknown: str = "refuse"
) -> tuple[dict[str, np.ndarray], int]:
    """A request's ``inputs`` against any signature: a DataFrame signature's table (records, columns or
    rows; ``unknown`` columns refused or ignored), a model without a signature (``schemaless``), else a
    tensor signature (``service.signature.decode_inputs``). The arrays in signature order and their
    shared row count."""
    if not specs:
        values = schemaless(raw)
    elif is_table(specs):
        table = columns_of(specs, raw, unknown=unknown)
        values = {s.name: column_array(s, table[s.name]) for s in specs if s.name in table}
    else:
        return signature.decode_inputs(specs, raw)
    return values, signature.shared_rows(values)


def column_spec(name: str, mlflow_type: str, required: bool = True) -> TensorSpec:
    """The spec of one column; types outside ``DTYPES`` (array, object, map, any) are objects."""
    return TensorSpec(name, DTYPES.get(mlflow_type, np.dtype(object)), (-1,), mlflow_type, required)


def is_table(specs: Sequence[TensorSpec]) -> bool:
    """Whether ``specs`` are a DataFrame signature's columns."""
    return bool(specs) and specs[0].column is not None


def columns_of(specs: Sequence[TensorSpec], raw: Any, *, unknown: str = "refuse") -> dict[str, Any]:
    """A request's table as ``{column: cells}``, from records (``[{"a": 1, ...}, ...]``), columns
    (``{"a": [...], ...}``) or rows in signature order (``[[1, "x"], ...]``).

    ``unknown`` columns are refused (``"refuse"``: Ferry's own protocols) or dropped (``"ignore"``: MLflow's
    scoring protocol ignores them). A required column that is missing is refused; an optional one is
    left out, as MLflow leaves it out of the DataFrame."""
    if isinstance(raw, Mapping):
        table = dict(raw)
    elif isinstance(raw, list) and raw and all(isinstance(r, Mapping) for r in raw):
        table = _records(raw)
    elif isinstance(raw, list) and raw and all(isinstance(r, list) for r in raw):
        table = _positional(specs, raw)
    else:
        names = [s.name for s in specs]
        raise InvalidInput(
            f"inputs: expected a table: records [{{column: value}}, ...] or columns {{column: [values]}} "
            f"with the columns {names}",
            field="inputs",
            expected=names,
        )
    known = {s.name for s in specs}
    extra = [c for c in table if c not in known]
    if extra:
        if unknown == "refuse":
            raise InvalidInput(
                f"unknown column(s) {extra}; the model takes {[s.name for s in specs]}",
                unknown=extra,
                expected=[s.name for s in specs],
            )
        for column in extra:
            del table[column]
    missing = [s.name for s in specs if s.required and s.name not in table]
    if missing:
        raise InvalidInput(f"missing required column(s) {missing}", missing=missing)
    return {s.name: table[s.name] for s in specs if s.name in table}  # signature order


def _records(records: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Records to columns; a record that lacks a column holds null there (refused where it is required)."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {str(n): [r.get(n) for r in records] for n in names}


def _positional(specs: Sequence[TensorSpec], rows: list[list[Any]]) -> dict[str, list[Any]]:
    width = len(specs)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInput(
                f"inputs: row {i} has {len(row)} values; the model takes {width} columns "
                f"{[s.name for s in specs]} (send records or columns to name them)",
                field="inputs",
            )
    return {s.name: [row[j] for row in rows] for j, s in enumerate(specs)}


def column_array(spec: TensorSpec, cells: Any) -> np.ndarray:
    """One column's cells (a list, or an array a binary protocol decoded) as a 1-D array of the
    column's dtype; nulls only where the column is optional."""
    name, kind = spec.name, spec.column
    if isinstance(cells, signature.DecodedArray):  # numbers the JSON parser decoded straight to float64
        cells = cells.values if spec.dtype.kind == "f" else cells.original()
    if isinstance(cells, np.ndarray):
        if cells.ndim == 2 and cells.shape[1] == 1:  # MLServer's pandas codec sends [N, 1] columns
            cells = cells[:, 0]
        if cells.ndim != 1:
            raise InvalidValue(
                f"column {name!r}: expected one value per row (shape [-1]), got shape {list(cells.shape)}",
                input=name,
            )
        if cells.dtype.kind != "O":
            return _typed(spec, cells)
        cells = cells.tolist()
    elif not isinstance(cells, list):
        raise InvalidValue(
            f"column {name!r}: expected a list with one value per row, got a single {type(cells).__name__}",
            input=name,
        )
    if not cells:
        raise InvalidValue(f"column {name!r}: no rows (empty batch)", input=name)
    nulls = [i for i, c in enumerate(cells) if c is None]
    if nulls and spec.required:
        raise InvalidValue(
            f"column {name!r} is required but row {nulls[0]} holds null", input=name, row=nulls[0]
        )
    if kind == "string":
        return _objects(name, cells, str, "strings", _utf8)
    if kind == "binary":
        return _objects(name, cells, bytes, "bytes (base64 in JSON)", _base64)
    if spec.dtype.kind == "O":  # array, object, map, any: the JSON values as they are
        return _object_array(cells)
    if nulls:
        # pandas' own treatment of a missing value: NaN in a float column (an integer column with a
        # null becomes float64, as pandas makes it); booleans with nulls stay objects.
        if spec.dtype.kind in "fiu":
            target = spec.dtype if spec.dtype.kind == "f" else np.dtype(np.float64)
            present = [c for c in cells if c is not None]
            checked = _typed(spec, _numbers(name, present, spec)) if present else None
            out = np.full(len(cells), np.nan, dtype=target)
            if checked is not None:
                mask = np.array([c is not None for c in cells])
                out[mask] = checked
            return out
        return _object_array(cells)
    if kind == "datetime":
        return _datetimes(name, cells)
    return _typed(spec, _numbers(name, cells, spec))


def _numbers(name: str, cells: list[Any], spec: TensorSpec) -> np.ndarray:
    if any(isinstance(c, (list, dict)) for c in cells):
        raise InvalidValue(
            f"column {name!r}: expected one {spec.column} value per row, got a list or object", input=name
        )
    try:
        return signature.json_array(cells, guard=True)
    except (ValueError, TypeError):
        raise InvalidValue(f"column {name!r}: expected {spec.column} values", input=name) from None


def _typed(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.column == "datetime" and array.dtype.kind in "UO":
        return _datetimes(spec.name, array.tolist())
    if spec.dtype.kind == "O":
        if spec.column == "string" and array.dtype.kind in "US":
            return _objects(spec.name, array.tolist(), str, "strings", _utf8)
        if spec.column == "binary" and array.dtype.kind == "S":
            return _object_array(array.tolist())
        if spec.column in ("string", "binary"):
            expected = "strings" if spec.column == "string" else "bytes"
            raise InvalidValue(
                f"column {spec.name!r}: expected {expected}, got {array.dtype.name} values", input=spec.name
            )
        return _object_array(array.tolist())
    if spec.dtype.kind in "iu" and array.dtype.kind == "f":
        # 3.0 for a long column is 3, as pandas and MLflow take it (JSON writers may add the ".0");
        # 3.5 is no integer: refused, never truncated.
        whole = np.isfinite(array) & (array == np.floor(array))
        if not whole.all():
            row = int(np.argmin(whole))
            raise InvalidValue(
                f"column {spec.name!r}: expected {spec.column} values, "
                f"got {float(array[row])!r} in row {row}",
                input=spec.name,
                row=row,
            )
        array = array.astype(np.int64) if np.abs(array).max() < 2.0**63 else array
    try:
        return signature.check_array(TensorSpec(spec.name, spec.dtype, (-1,)), array, wording=_wording())
    except InvalidValue:
        raise
    except InvalidInput as exc:  # a value of the wrong kind or out of range
        raise InvalidValue(exc.message, **exc.details) from None


@functools.cache
def _wording() -> signature.Wording:
    """How a column's refusals read: the column and its MLflow type (``long``, not ``int64``)."""
    names = {dtype: name for name, dtype in DTYPES.items() if dtype.kind != "O"}
    return dataclasses.replace(
        signature.FERRY,
        label=lambda dtype: names.get(dtype, dtype.name),
        kind="column {name!r}: expected {label} values, got {got}",
        out_of_range="column {name!r}: a value is out of range for {label} ({min}..{max})",
        too_large="column {name!r}: a value is too large for {label} (largest is {largest:.6g})",
    )


def _objects(name: str, cells: list[Any], kind: type, label: str, convert: Any) -> np.ndarray:
    """An object array of ``kind`` values (nulls kept): other values are converted by ``convert`` where
    the protocol carries them differently (a v2 ``BYTES`` string arrives as bytes), else refused."""
    out = np.empty(len(cells), dtype=object)
    for i, cell in enumerate(cells):
        if cell is not None and type(cell) is not kind:
            cell = convert(name, i, cell)
            if cell is None:
                raise InvalidValue(
                    f"column {name!r}: expected {label}, got {_what(cells[i])} in row {i}", input=name, row=i
                )
        out[i] = cell
    return out


def _utf8(name: str, row: int, cell: Any) -> str | None:
    if isinstance(cell, bytes):
        try:
            return cell.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValue(f"column {name!r}: row {row} is not UTF-8 text", input=name, row=row) from None
    return cell if isinstance(cell, str) else None


def _base64(name: str, row: int, cell: Any) -> bytes | None:
    if not isinstance(cell, str):
        return None
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidValue(f"column {name!r}: row {row} is not base64", input=name, row=row) from None


def _datetimes(name: str, cells: list[Any]) -> np.ndarray:
    if not all(isinstance(c, str) for c in cells):
        bad = next(c for c in cells if not isinstance(c, str))
        raise InvalidValue(f"column {name!r}: expected ISO 8601 date-times, got {_what(bad)}", input=name)
    try:
        return np.array(cells, dtype="datetime64[ns]")
    except ValueError as exc:
        raise InvalidValue(f"column {name!r}: not an ISO 8601 date-time: {exc}", input=name) from None


def _object_array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # one by one: numpy would read nested lists as more axes
        out[i] = value
    return out


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


POSITIONAL = ""
"""The one input of a model without a signature that was sent rows rather than a table: the pyfunc
runtime hands it to the model as the array itself, as MLflow's scoring server does."""


def schemaless(raw: Any) -> dict[str, np.ndarray]:
    """A request for a model without a signature: a table (records or columns) becomes its columns, each
    an array of what the JSON holds (numbers, else objects); rows (a nested list) become one array. The
    model checks them itself; what it refuses is the client's error (``runtime/pyfunc.py``)."""
    if isinstance(raw, signature.DecodedArray):
        return {POSITIONAL: raw.values}
    if isinstance(raw, list) and raw and all(isinstance(r, Mapping) for r in raw):
        raw = _records(raw)
    if isinstance(raw, Mapping):
        if not raw:
            raise InvalidInput("inputs: the table has no columns", field="inputs")
        out = {}
        for name, cells in raw.items():
            if isinstance(cells, signature.DecodedArray):
                out[str(name)] = cells.values
                continue
            if not isinstance(cells, list) or not cells:
                raise InvalidInput(f"column {name!r}: expected a non-empty list of values", input=name)
            out[str(name)] = _inferred(cells)
        return out
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("inputs: expected rows (a non-empty list) or a table", field="inputs")
    try:
        array = signature.json_array(raw, guard=True)
    except (ValueError, TypeError):
        raise InvalidInput("inputs: rows have different lengths (ragged)", field="inputs") from None
    return {POSITIONAL: array if array.dtype.kind not in "UO" else np.array(raw, dtype=object)}


def _inferred(cells: list[Any]) -> np.ndarray:
    if all(type(c) in (int, float) for c in cells) or all(type(c) is bool for c in cells):
        try:
            array = signature.json_array(cells)
            if array.dtype.kind != "O":
                return array
        except (ValueError, TypeError):
            pass
    return _object_array(cells)
