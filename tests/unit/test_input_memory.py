"""Memory per request (issue 14): a string among numbers for a numeric input is refused without numpy's
fixed-width string array, which is sized by the longest string (here 1,001 values of 129,000 characters:
516 MB from a 150 KB body), on each protocol."""

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
