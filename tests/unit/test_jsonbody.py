"""Request bodies decoded with simdjson give what orjson gives: the same values, arrays and errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.jsonbody import loads_object, parse_object
from service.errors import BadRequest, InvalidInput
from service.runtime.base import TensorSpec
from service.signature import DecodedArray, decode_inputs

F = TensorSpec("x", np.dtype(np.float32), (-1, 3))
IDS = TensorSpec("ids", np.dtype(np.int64), (-1,))


def plain(value: Any) -> Any:
    """A parsed value with its decoded arrays turned back into the JSON they came from (as orjson reads
    it), after checking that the decoded values are those numbers."""
    if isinstance(value, DecodedArray):
        np.testing.assert_array_equal(value.values, np.array(value.original(), dtype=np.float64))
        return value.original()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def test_rows_of_numbers_are_decoded_straight_to_float64() -> None:
    body = b'{"model": "m", "inputs": [[1, 2.5, -3e-2], [4, 5, 6]], "params": {"k": [1, 2]}}'
    parsed = parse_object(body)
    inputs = parsed["inputs"]
    assert isinstance(inputs, DecodedArray)
    assert inputs.values.dtype == np.float64 and inputs.values.shape == (2, 3)
    assert inputs.values.flags.writeable
    assert parsed == {**orjson.loads(body), "inputs": inputs}
    np.testing.assert_array_equal(inputs.values, np.array(orjson.loads(body)["inputs"], dtype=np.float64))
    assert inputs.original() == [[1, 2.5, -0.03], [4, 5, 6]]


def test_named_inputs_and_higher_ranks_are_decoded() -> None:
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5) / 7
    body = orjson.dumps({"inputs": {"image": image.tolist(), "ids": [1, 2]}})
    inputs = parse_object(body)["inputs"]
    assert isinstance(inputs["image"], DecodedArray) and isinstance(inputs["ids"], DecodedArray)
    np.testing.assert_array_equal(inputs["image"].values, image)
    assert inputs["ids"].original() == [1, 2]
    mixed = parse_object(b'{"inputs": {"x": [[1, 2], [3]], "y": [[1]]}}')["inputs"]
    assert mixed["x"] == [[1, 2], [3]] and isinstance(mixed["y"], DecodedArray)


@pytest.mark.parametrize(
    "inputs",
    [
        b"[[1, 2], [3]]",  # ragged rows
        b"[[1, 2], [3], [4, 5, 6]]",  # ragged with the element count of a regular 3x2
        b"[[1, [2]]]",  # an array where a number should be (flattens like [[1, 2]])
        b"[[[1], 2]]",
        b"[[1, null]]",
        b'[[1, "a"]]',
        b"[[true, 2]]",
        b"[]",
        b"[[]]",
        b'"text"',
        b"5",
        b"null",
    ],
)
def test_anything_but_a_regular_array_of_numbers_is_what_orjson_gives(inputs: bytes) -> None:
    body = b'{"inputs": ' + inputs + b"}"
    parsed = parse_object(body)
    assert parsed == orjson.loads(body)  # plain lists and values: nothing was decoded


def test_a_bracket_elsewhere_in_the_body_only_costs_speed() -> None:
    body = b'{"model": "m[1]", "inputs": [[1, 2]], "params": {"windows": [[0, 1]]}}'
    assert plain(parse_object(body)) == orjson.loads(body)


def test_duplicate_keys_resolve_as_orjson_does() -> None:
    body = b'{"inputs": [[1, 2]], "inputs": [[3, 4]]}'
    assert plain(parse_object(body)) == orjson.loads(body) == {"inputs": [[3, 4]]}
    nested = b'{"inputs": {"x": [[1]], "x": [[2]]}}'
    assert plain(parse_object(nested)) == orjson.loads(nested)
    deep = b'{"inputs": [[1]], "params": {"a": {"x": 1, "x": 2}, "a": {"x": 3, "x": 4}}}'
    assert plain(parse_object(deep)) == orjson.loads(deep) == {"inputs": [[1]], "params": {"a": {"x": 4}}}


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"inputs": [[1, 2]]', b'{"inputs": [[NaN]]}', b"[1, 2]", b'"x"', b'{"a": 1e400}', b"\xff"],
)
def test_bodies_that_are_not_json_objects_get_orjsons_answer(body: bytes) -> None:
    with pytest.raises(BadRequest) as fast:
        parse_object(body)
    with pytest.raises(BadRequest) as plain_error:
        loads_object(body)
    assert fast.value.message == plain_error.value.message
    assert fast.value.status == 400


def test_numbers_simdjson_refuses_are_read_by_orjson() -> None:
    body = b'{"inputs": [[18446744073709551616, 1]]}'
    assert parse_object(body) == orjson.loads(body)


def test_integer_inputs_use_the_exact_json_values() -> None:
    big = 2**53 + 1  # not a double: the decoded float64 would round it
    parsed = parse_object(orjson.dumps({"inputs": [big, 2]}))
    arrays, rows = decode_inputs([IDS], parsed["inputs"])
    assert rows == 2 and arrays["ids"].tolist() == [big, 2] and arrays["ids"].dtype == np.int64
    with pytest.raises(InvalidInput, match="expected int64 values, got float64"):
        decode_inputs([IDS], parse_object(b'{"inputs": [1.5, 2]}')["inputs"])


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (b"[[1, 2]]", "expected shape [-1, 3] (rows first), got [1, 2]"),
        (b"[1, 2, 3]", "wrap a single row in a list"),
        (b"[[1, 2, 3], [1, 2]]", "ragged"),
        (b"[[1e39, 0, 0]]", "too large for float32"),
        (b"[[1, null, 3]]", "non-numeric"),
    ],
)
def test_validation_messages_do_not_depend_on_the_decoder(inputs: bytes, fragment: str) -> None:
    body = b'{"inputs": ' + inputs + b"}"
    with pytest.raises(InvalidInput) as fast:
        decode_inputs([F], parse_object(body)["inputs"])
    with pytest.raises(InvalidInput) as slow:
        decode_inputs([F], orjson.loads(body)["inputs"])
    assert fragment in fast.value.message and fast.value.message == slow.value.message


numbers = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False, width=64)
)
leaves = st.one_of(numbers, numbers, numbers, st.none(), st.booleans(), st.text(max_size=3))
nested = st.recursive(st.lists(leaves, max_size=4), lambda inner: st.lists(inner, max_size=4), max_leaves=40)
regular = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)).flatmap(
    lambda shape: st.lists(
        st.lists(
            st.lists(numbers, min_size=shape[2], max_size=shape[2]), min_size=shape[1], max_size=shape[1]
        ),
        min_size=shape[0],
        max_size=shape[0],
    )
)


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.one_of(nested, regular),
    model=st.sampled_from(["m", "m[", "[]"]),
    extra=st.dictionaries(st.text(max_size=4), leaves, max_size=2),
)
def test_any_inputs_decode_to_what_orjson_gives(inputs: Any, model: str, extra: dict[str, Any]) -> None:
    # json.dumps escapes what orjson would refuse to write (lone surrogates) and NUL characters.
    body = json.dumps({**extra, "model": model, "inputs": inputs}).encode()
    try:
        expected = orjson.loads(body)
    except orjson.JSONDecodeError:
        with pytest.raises(BadRequest):
            parse_object(body)
        return
    parsed = parse_object(body)
    value = parsed["inputs"]
    if isinstance(value, DecodedArray):
        # Decoded only when regular and all numbers: the same array numpy builds from orjson's lists.
        reference = np.array(expected["inputs"])
        assert reference.dtype.kind in "iuf" and reference.shape == value.values.shape
        np.testing.assert_array_equal(value.values, reference.astype(np.float64))
        assert value.original() == expected["inputs"]
        assert parsed["model"] == model
    else:
        assert parsed == expected


def test_mlflow_payloads_decode_inputs_and_instances() -> None:
    from service.api.frames import json_payload

    assert isinstance(json_payload(b'{"instances": [[1, 2], [3, 4]]}')["instances"], DecodedArray)
    assert isinstance(json_payload(b'{"inputs": {"x": [[1.5]]}}')["inputs"]["x"], DecodedArray)
    records = b'{"instances": [{"x": 1}, {"x": 2}]}'
    assert json_payload(records) == orjson.loads(records)
    with pytest.raises(BadRequest, match=r"exactly one of \['dataframe_split'.*got list"):
        json_payload(b"[1]")


@pytest.mark.parametrize(
    "body",
    [b'{"\\u0000": null}', b'{"a\\u0000b": 1, "inputs": [[1]]}', b'{"inputs": {"\\u0000": [[1]]}}'],
)
def test_keys_with_nul_characters_are_read(body: bytes) -> None:
    # simdjson cannot look such keys up (found by the fuzz tests: a 500 for {"\u0000": null}).
    assert plain(parse_object(body)) == orjson.loads(body)


def test_open_inference_protocol_tensor_data_is_decoded() -> None:
    from service.api.tensors import decode_inputs as decode_tensors

    rows = np.arange(6, dtype=np.float64).reshape(2, 3) / 4
    header = orjson.dumps(
        {
            "id": "7",
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": rows.tolist()},
                {"name": "ids", "shape": [2], "datatype": "INT64", "data": [2**53 + 1, 2]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    parsed = parse_object(header, arrays=(), tensors=("inputs",))
    assert plain_tensors(parsed) == orjson.loads(header)
    x, ids = (t["data"] for t in parsed["inputs"])
    assert isinstance(x, DecodedArray) and isinstance(ids, DecodedArray)
    arrays = decode_tensors([F, IDS], parsed["inputs"], memoryview(b""))
    np.testing.assert_array_equal(arrays["x"], rows.astype(np.float32))
    assert arrays["ids"].tolist() == [2**53 + 1, 2]  # exact: integers come from the JSON itself


def plain_tensors(parsed: dict[str, Any]) -> dict[str, Any]:
    return {**parsed, "inputs": [plain(t) for t in parsed["inputs"]]}
