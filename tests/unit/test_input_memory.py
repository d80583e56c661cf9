"""Memory per request (issue 14): a string among numbers for a numeric input is refused without numpy's
fixed-width string array, which is sized by the longest string (here 1,001 values of 129,000 characters:
516 MB from a 150 KB body), on each protocol; and decoding any body, valid or not, on every protocol and
content type, allocates at most ``BOUND`` times its size."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from service.api import frames, tensors
from service.api.jsonbody import parse_object
from service.errors import InvalidInput
from service.runtime.base import TensorSpec
from service.signature import decode_inputs

NUMBERS = 1000
SPEC = TensorSpec("x", np.dtype(np.float32), (-1, NUMBERS + 1))
ROW = ["s" * 129_000, *(0.12345678901234567 + i for i in range(NUMBERS))]


def _predict(body: bytes) -> Any:
    return decode_inputs([SPEC], parse_object(body)["inputs"])


def _v2(body: bytes) -> Any:
    parsed = parse_object(body, arrays=(), tensors=("inputs",))
    return tensors.decode_inputs([SPEC], parsed["inputs"], memoryview(b""))


def _invocations(body: bytes) -> Any:
    return decode_inputs([SPEC], frames.payload_inputs([SPEC], frames.json_payload(body)))


@pytest.mark.parametrize(
    ("payload", "decode", "message"),
    [
        ({"inputs": [ROW]}, _predict, "input 'x': expected float32 values, got strings"),
        ({"inputs": {"x": [ROW]}}, _predict, "input 'x': expected float32 values, got strings"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, NUMBERS + 1], "data": [ROW]}]},
            _v2,
            "input 'x': datatype FP32 but 'data' holds strings",
        ),
        (
            {"dataframe_split": {"data": [ROW]}},
            _invocations,
            "input 'x': expected float32 values, got strings",
        ),
        ({"instances": [ROW]}, _invocations, "input 'x': expected float32 values, got strings"),
    ],
)
def test_a_long_string_among_numbers_is_refused_in_little_memory(
    payload: dict[str, Any], decode: Callable[[bytes], Any], message: str
) -> None:
    body = orjson.dumps(payload)
    assert 140_000 < len(body) < 160_000
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as info:
            decode(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.message == message
    assert peak < 10 * len(body), f"peak {peak} bytes for a body of {len(body)}"


def _csv(body: bytes) -> Any:
    return decode_inputs([SPEC], frames.csv_inputs([SPEC], body))


def test_a_long_string_in_csv_is_refused_in_little_memory() -> None:
    header = ",".join(f"f{i}" for i in range(len(ROW)))
    body = f"{header}\n{','.join(str(v) for v in ROW)}\n".encode()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="CSV holds a value that is not a number"):
            _csv(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # About 11x (the text, then a str per field); a fixed-width array of the fields would be 3,000x.
    assert peak < BOUND * len(body), f"peak {peak} bytes for a body of {len(body)}"


BOUND = 40
"""The most a body's decoding may allocate, in multiples of its size, whatever it holds. Arrays of numbers
cost about 1.4x (simdjson hands them over as one buffer); the worst case measured is a table of
one-column records (about 33x: each 10-byte record becomes a Python dict, from orjson, before its column
is built; orjson reads records four times faster than walking simdjson's values)."""


def _bodies() -> dict[str, tuple[bytes, Callable[[bytes], Any]]]:
    from service.columns import column_spec
    from service.columns import decode_inputs as decode_any

    rng = np.random.default_rng(0)
    numbers = rng.standard_normal((2000, 32)).round(6).tolist()
    spec = TensorSpec("x", np.dtype(np.float32), (-1, 32))
    columns = [column_spec(f"c{i}", "double") for i in range(4)] + [column_spec("s", "string")]
    records = [{**{f"c{i}": row[i] for i in range(4)}, "s": "abc"} for row in numbers]
    header = "c0,c1,c2,c3,s\n"

    def table(raw: Any, unknown: str = "refuse") -> Any:
        return decode_any(columns, raw, unknown=unknown)

    return {
        "predict-numbers": (
            orjson.dumps({"inputs": numbers}),
            lambda b: decode_any([spec], parse_object(b)["inputs"]),
        ),
        "v2-json": (
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2000, 32], "data": numbers}]}
            ),
            lambda b: tensors.decode_inputs(
                [spec], parse_object(b, arrays=(), tensors=("inputs",))["inputs"], memoryview(b"")
            ),
        ),
        "v2-binary": (
            np.asarray(numbers, dtype=np.float32).tobytes(),
            lambda b: tensors.decode_inputs(
                [spec],
                [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2000, 32],
                        "parameters": {"binary_data_size": len(b)},
                    }
                ],
                memoryview(b),
            ),
        ),
        "invocations-split": (
            orjson.dumps({"dataframe_split": {"data": numbers}}),
            lambda b: decode_any([spec], frames.payload_inputs([spec], frames.json_payload(b))),
        ),
        "invocations-csv": (
            "\n".join(",".join(map(str, row)) for row in numbers).encode(),
            lambda b: decode_any([spec], frames.csv_inputs([spec], b)),
        ),
        "predict-records": (orjson.dumps({"inputs": records}), lambda b: table(parse_object(b)["inputs"])),
        "predict-one-column-records": (
            orjson.dumps({"inputs": [{"a": 1.5}] * 5000}),
            lambda b: decode_any([column_spec("a", "double")], parse_object(b)["inputs"]),
        ),
        "invocations-records": (
            orjson.dumps({"dataframe_records": records}),
            lambda b: table(frames.payload_inputs(columns, frames.json_payload(b)), "ignore"),
        ),
        "invocations-table-csv": (
            (header + "\n".join(",".join(map(str, r[:4])) + ",abc" for r in numbers)).encode(),
            lambda b: table(frames.csv_inputs(columns, b)),
        ),
        "table-long-string": (
            orjson.dumps(
                {"inputs": {**{f"c{i}": [0.5] * 2000 for i in range(4)}, "s": ["x" * 100_000] + ["y"] * 1999}}
            ),
            lambda b: table(parse_object(b)["inputs"]),
        ),
    }


@pytest.mark.parametrize("case", list(_bodies()))
def test_decoding_any_body_allocates_at_most_a_small_multiple_of_its_size(case: str) -> None:
    body, decode = _bodies()[case]
    decode(body)  # once outside the measurement: imports and caches are not the body's
    tracemalloc.start()
    try:
        decode(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BOUND * len(body), f"{case}: peak {peak} bytes for a body of {len(body)}"
