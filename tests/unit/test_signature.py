"""Input decoding against a signature: every bad input is an InvalidInput naming the input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.errors import InvalidInput
from service.runtime.base import TensorSpec
from service.signature import check_finite, decode_inputs

F = TensorSpec("x", np.dtype(np.float32), (-1, 3))
IDS = TensorSpec("ids", np.dtype(np.int32), (-1,))


def test_single_input_rows_become_float32() -> None:
    arrays, rows = decode_inputs([F], [[1, 2, 3], [4.5, 5, 6]])
    assert rows == 2
    assert arrays["x"].dtype == np.float32 and arrays["x"].tolist() == [[1, 2, 3], [4.5, 5, 6]]


def test_named_inputs() -> None:
    arrays, rows = decode_inputs([F, IDS], {"x": [[1, 2, 3]], "ids": [7]})
    assert rows == 1 and arrays["ids"].dtype == np.int32


@pytest.mark.parametrize(
    ("specs", "raw", "fragment"),
    [
        ([F], [[1, 2]], "expected shape [-1, 3] (rows first), got [1, 2]"),
        ([F], [1, 2, 3], "wrap a single row in a list"),
        ([F], [[1, 2, 3], [1, 2]], "ragged"),
        ([F], [["a", "b", "c"]], "expected float32 values, got strings"),
        ([F], [[1, None, 3]], "non-numeric"),
        ([F], [[True, False, True]], "expected float32 values, got bool"),
        ([F], [], "expected shape"),
        ([F], [[1e39, 0, 0]], "too large for float32"),
        ([F], 5, "got a single int"),
        ([IDS], [1.5], "expected int32 values, got float64"),
        ([IDS], [2**40], "out of range for int32"),
        ([F, IDS], [[1, 2, 3]], "send inputs as an object"),
        ([F, IDS], {"x": [[1, 2, 3]]}, "missing input(s) ['ids']"),
        ([F], {"x": [[1, 2, 3]], "y": [1]}, "unknown input(s) ['y']"),
        ([F, IDS], {"x": [[1, 2, 3]], "ids": [1, 2]}, "disagree on the number of rows"),
    ],
)
def test_bad_inputs_are_named(specs: list[TensorSpec], raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs(specs, raw)
    assert fragment in info.value.message
    assert info.value.status == 422


def test_empty_batch_is_refused() -> None:
    spec = TensorSpec("x", np.dtype(np.float32), (-1,))
    with pytest.raises(InvalidInput, match="empty batch"):
        decode_inputs([spec], [])


def test_check_finite_refuses_nan() -> None:
    with pytest.raises(InvalidInput, match="NaN"):
        check_finite(F, np.array([[np.nan, 0, 0]], dtype=np.float32))
