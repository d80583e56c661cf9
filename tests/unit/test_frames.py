"""MLflow scoring payloads to tensor inputs: each of MLflow's JSON forms and CSV, and each malformed one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.api import frames
from service.errors import BadRequest, InvalidInput
from service.runtime.base import TensorSpec
from service.signature import decode_inputs

X = TensorSpec("input", np.dtype(np.float32), (-1, 4))
AGE = TensorSpec("age", np.dtype(np.int64), (-1, 1))
NAME = TensorSpec("score", np.dtype(np.float32), (-1,))
ROWS = [[1, 2, 3, 4], [0.5, 0, 0, 0]]


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": ROWS},
        {"inputs": {"input": ROWS}},
        {"instances": ROWS},
        {"instances": [{"input": row} for row in ROWS]},
        {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": ROWS, "index": [0, 1]}},
        {"dataframe_split": {"data": ROWS}},
        {"dataframe_split": {"columns": ["input"], "data": [[row] for row in ROWS]}},
        {"dataframe_records": [dict(zip("abcd", row, strict=True)) for row in ROWS]},
        {"dataframe_records": [{"input": row} for row in ROWS]},
    ],
    ids=[
        "inputs",
        "inputs-named",
        "instances",
        "instances-named",
        "split",
        "split-no-columns",
        "split-input-column",
        "records",
        "records-input-column",
    ],
)
def test_every_form_gives_the_same_rows(payload: dict[str, Any]) -> None:
    arrays, rows = decode_inputs([X], frames.payload_inputs([X], payload))
    assert rows == 2 and arrays["input"].dtype == np.float32
    assert arrays["input"].tolist() == ROWS


def test_columns_feed_inputs_of_the_same_name() -> None:
    payload = {
        "dataframe_records": [
            {"age": 30, "score": 0.5, "extra": "x"},
            {"age": 40, "score": 1.5, "extra": "y"},
        ]
    }
    arrays, rows = decode_inputs([AGE, NAME], frames.payload_inputs([AGE, NAME], payload))
    assert rows == 2 and arrays["age"].tolist() == [[30], [40]] and arrays["score"].tolist() == [0.5, 1.5]


@pytest.mark.parametrize(
    ("body", "header"),
    [
        (b"a,b,c,d\n1,2,3,4\n0.5,0,0,0\n", ["a", "b", "c", "d"]),
        (b"1,2,3,4\r\n0.5,0,0,0\r\n\r\n", None),
        (b'"a","b","c","d"\n"1",2,3,4\n0.5,0,0,0', ["a", "b", "c", "d"]),
    ],
)
def test_csv(body: bytes, header: list[str] | None) -> None:
    arrays, rows = decode_inputs([X], frames.csv_inputs([X], body))
    assert rows == 2 and arrays["input"].tolist() == ROWS
    assert frames._csv_table(body)[0] == header


def test_csv_columns_feed_named_inputs_and_keep_integers() -> None:
    arrays, _ = decode_inputs([AGE, NAME], frames.csv_inputs([AGE, NAME], b"score,age\n0.5,30\n1.5,40\n"))
    assert arrays["age"].dtype == np.int64 and arrays["age"].tolist() == [[30], [40]]


@pytest.mark.parametrize(
    ("payload", "error", "fragment"),
    [
        ({"inputs": ROWS, "instances": ROWS}, BadRequest, "exactly one of"),
        ({"rows": ROWS}, BadRequest, "it holds ['rows']"),
        ({"dataframe_split": ROWS}, InvalidInput, "dataframe_split must be an object"),
        ({"dataframe_split": {"data": ROWS, "orient": "split"}}, InvalidInput, "dataframe_split must be"),
        (
            {"dataframe_split": {"columns": ["a"], "data": ROWS}},
            InvalidInput,
            "row 0 has 4 values for 1 columns",
        ),
        ({"dataframe_split": {"data": [1, 2]}}, InvalidInput, "'data' must be a list of rows"),
        ({"dataframe_records": {"a": 1}}, InvalidInput, "non-empty list of records"),
        (
            {"dataframe_records": [{"a": 1}, {"b": 2}]},
            InvalidInput,
            "dataframe_records[1] lacks the column 'a'",
        ),
        ({"dataframe_records": [{"a": 1}, {"a": 1, "b": 2}]}, InvalidInput, "every record must have"),
        ({"instances": [{"input": [1, 2, 3, 4]}, {}]}, InvalidInput, "instances[1] lacks the column 'input'"),
    ],
)
def test_malformed_payloads(payload: dict[str, Any], error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        frames.payload_inputs([X], payload)
    assert fragment in str(info.value)


def test_table_without_the_input_names_needs_a_single_input() -> None:
    with pytest.raises(InvalidInput, match="do not name the model's inputs"):
        frames.payload_inputs([AGE, NAME], {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}})


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        (b'a,b\n1,"2\n', BadRequest, "malformed CSV at line"),
        (b"1,2,3,4\n1,2\n", BadRequest, "data row 2 has 2 fields, expected 4"),
        (b"a,b,c,d\n", BadRequest, "no data rows"),
        (b"", BadRequest, "no data rows"),
        (b"\xff\xfe", BadRequest, "not UTF-8"),
        (b"a,b,c,d\n1,2,x,4\n", InvalidInput, "not a number: 'x'"),
        (b"1,2,3,nan\n", InvalidInput, "NaN or infinite"),
        (b"1,2,3,\n", InvalidInput, "not a number: ''"),
    ],
)
def test_malformed_csv(body: bytes, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        frames.csv_inputs([X], body)
    assert fragment in str(info.value)


def test_json_payload_must_be_an_object() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        frames.json_payload(b"{")
    with pytest.raises(BadRequest, match="got list"):
        frames.json_payload(b"[[1, 2, 3, 4]]")
