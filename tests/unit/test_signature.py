"""Input decoding against a signature: every bad input is an InvalidInput naming the input."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from service import signature
from service.errors import InvalidInput
from service.runtime.base import TensorSpec
from service.signature import check_array, check_finite, decode_inputs, json_array

F = TensorSpec("x", np.dtype(np.float32), (-1, 3))
F16 = TensorSpec("h", np.dtype(np.float16), (-1, 3))
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


def test_check_finite_is_part_of_check_array_on_request() -> None:
    array = np.array([[np.inf, 0, 0]])
    assert check_array(F, array).tolist() == [[np.inf, 0, 0]]
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        check_array(F, array, finite=True)


@pytest.mark.parametrize(
    ("spec", "values", "fragment"),
    [
        # Narrowing is checked on the range for a few values, on the result for many: the same answers.
        (F16, [[65504.0, -65504.0, 65519.9]], None),
        (F16, [[65520.0, 0, 0]], "too large for float16 (largest is 65504)"),
        (F16, [[1.0, 2.0, 3.0]] * 3000, None),
        (F16, [[1.0, 2.0, 3.0]] * 3000 + [[0, 0, -65520.0]], "too large for float16"),
        (F, [[3.4028235e38, -3.4028235e38, 1e-50]], None),
        (F, [[np.nan, np.inf, 1e39]], None),  # not finite to begin with: check_finite's to refuse, or not
        (F, [[1e308, 0, 0]], "too large for float32 (largest is 3.40282e+38)"),
    ],
)
def test_narrowing_floats(spec: TensorSpec, values: list[list[float]], fragment: str | None) -> None:
    array = np.array(values, dtype=np.float64)
    if fragment is None:
        with np.errstate(over="ignore"):
            expected = array.astype(spec.dtype)
        np.testing.assert_array_equal(check_array(spec, array), expected)
    else:
        with pytest.raises(InvalidInput, match=re.escape(fragment)):
            check_array(spec, array)


def test_datatype_table_is_shared() -> None:
    from service.api import tensors

    assert tensors.DATATYPES is signature.DATATYPES and tensors.datatype_of is signature.datatype_of
    assert signature.datatype_of(np.dtype(np.float32)) == "FP32"
    assert signature.datatype_of(np.dtype("U3")) == "BYTES"


@pytest.mark.parametrize(
    ("value", "kind", "shape"),
    [
        (["a" * 1000, 1.0, 2.0], "U", (3,)),
        ([[1, 2], [3, "abc"]], "U", (2, 2)),
        ([["abc", True]], "U", (1, 2)),
        ([["abc", None]], "O", (1, 2)),  # objects: numpy's own array (references)
        ([["abc", {"a": 1}]], "O", (1, 2)),
        ([["abc", 2**70]], "O", (1, 2)),
        ([[1, None]], "O", (1, 2)),
        ([[1, 2**70]], "O", (1, 2)),
        ([[1.5, 2], [3, 4]], "f", (2, 2)),
        ([[True, False]], "b", (1, 2)),
        ([[]], "f", (1, 0)),
    ],
)
def test_json_array_builds_no_strings_for_a_dtype_without_them(
    value: Any, kind: str, shape: tuple[int]
) -> None:
    guarded = json_array(value, guard=True)
    assert (guarded.dtype.kind, guarded.shape) == (kind, shape)
    plain = json_array(value)
    assert (plain.dtype.kind, plain.shape) == (kind, shape)
    if kind == "U":
        assert guarded.nbytes <= 4 * guarded.size and guarded.base is not None  # a view of one ""
    else:
        assert guarded.tolist() == plain.tolist()


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value", [[[1, "x" * 100], [3]], [[1, 2], "x"], [["x"], [[1]]], [[""], [[1.0]]], deep("x", 70)]
)
def test_json_array_ragged_stays_ragged(value: Any) -> None:
    for guard in (False, True):
        with pytest.raises(ValueError):
            json_array(value, guard=guard)


@pytest.mark.parametrize(
    ("spec", "raw", "message", "details"),
    [
        (
            F,
            [["a", 1, 2]],
            "input 'x': expected float32 values, got strings",
            {"input": "x", "expected": "float32", "received": "strings"},
        ),
        (
            F,
            [[None, 1, 2]],
            "input 'x': expected float32 values, got non-numeric values (null, objects or mixed types)",
            {
                "input": "x",
                "expected": "float32",
                "received": "non-numeric values (null, objects or mixed types)",
            },
        ),
        (
            IDS,
            [2**40],
            "input 'ids': a value is out of range for int32 (-2147483648..2147483647)",
            {"input": "ids"},
        ),
        (
            F,
            [[1e39, 0, 0]],
            "input 'x': a value is too large for float32 (largest is 3.40282e+38)",
            {"input": "x"},
        ),
    ],
)
def test_ferry_words(spec: TensorSpec, raw: Any, message: str, details: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([spec], raw)
    assert (info.value.message, info.value.details) == (message, details)


@pytest.mark.parametrize(
    "value",
    [
        [[0.5, 1, True] * 1000],  # many numbers, one a float: built as float64 directly
        [[2**70] + [1.5] * 3000],  # an integer beyond 64 bits: objects, as numpy makes them
        [[-(2**63) - 1] + [1.5] * 3000],
        [[2**63 + 5] + [0.5] * 3000],
        [[1] * 3000],
        [[True] * 3000],
        [[0.25] * 64] * 64,
    ],
)
def test_json_array_of_numbers_is_numpys(value: Any) -> None:
    expected = np.array(value)
    guarded = json_array(value, guard=True)
    assert guarded.dtype == expected.dtype and guarded.shape == expected.shape
    assert guarded.tolist() == expected.tolist()
