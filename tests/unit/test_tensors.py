"""The Open Inference Protocol tensor codec: datatypes, JSON and binary data, against tritonclient's own
encoders where it has them; every bad tensor is an InvalidInput (or BadRequest) naming the input."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor

from service.api import tensors
from service.errors import BadRequest, InvalidInput
from service.runtime.base import TensorSpec
from service.signature import DecodedArray

X = TensorSpec("input", np.dtype(np.float32), (-1, 4))
IDS = TensorSpec("ids", np.dtype(np.int64), (-1,))
NUMERIC = [name for name in tensors.DATATYPES if name != "BYTES"]


@pytest.mark.parametrize("datatype", NUMERIC)
def test_datatypes_match_tritonclient(datatype: str) -> None:
    dtype = tensors.DATATYPES[datatype]
    assert np_to_triton_dtype(dtype) == datatype
    assert tensors.datatype_of(dtype.newbyteorder("=")) == datatype
    assert tensors.datatype_of(np.dtype(object)) == "BYTES" and tensors.datatype_of(np.dtype("U3")) == "BYTES"


def test_json_data_flat_or_nested() -> None:
    flat = tensors.decode_json("input", "FP32", [2, 4], [1, 2, 3, 4, 5, 6, 7, 8])
    nested = tensors.decode_json("input", "FP32", [2, 4], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert flat.dtype == np.float32 and flat.shape == (2, 4)
    assert np.array_equal(flat, nested)
    assert tensors.decode_json("b", "BOOL", [2], [True, False]).dtype == np.bool_
    assert tensors.decode_json("u", "UINT64", [1], [2**64 - 1]).tolist() == [2**64 - 1]
    assert tensors.decode_json("s", "BYTES", [2], ["a", "é"]).tolist() == ["a", "é"]
    assert tensors.decode_json("h", "FP16", [1], [0.5]).dtype == np.float16


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "fragment"),
    [
        ("FP32", [2, 4], [1, 2, 3, 4], "shape [2, 4] holds 8 values but 'data' has 4"),
        ("FP32", [1, 4], [["a", "b", "c", "d"]], "datatype FP32 but 'data' holds strings"),
        ("INT32", [2], [1.5, 2], "datatype INT32 but 'data' holds float64"),
        ("INT8", [1], [300], "out of range for INT8"),
        ("UINT8", [1], [-1], "out of range for UINT8"),
        ("FP16", [1], [1e6], "too large for FP16"),
        ("BOOL", [2], [1, 0], "datatype BOOL but 'data' holds int64"),
        ("FP32", [2, 2], [[1, 2], [3]], "ragged"),
        ("FP32", [1], [None], "null"),
        ("BYTES", [1], [1], "BYTES data must be strings"),
        ("FP32", [1], 5, "'data' must be a list"),
    ],
)
def test_bad_json_data(datatype: str, shape: list[int], data: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        tensors.decode_json("input", datatype, shape, data)
    assert fragment in info.value.message and "'input'" in info.value.message


@given(
    hnp.arrays(
        st.sampled_from([tensors.DATATYPES[d] for d in NUMERIC]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    )
)
def test_binary_round_trip(array: np.ndarray) -> None:
    datatype = tensors.datatype_of(array.dtype)
    blob = tensors.encode_binary(array)
    assert blob == array.astype(array.dtype.newbyteorder("<")).tobytes()  # what tritonclient sends
    decoded = tensors.decode_binary("x", datatype, list(array.shape), memoryview(bytearray(blob)))
    assert decoded.shape == array.shape
    assert decoded.tobytes() == blob


def test_bytes_tensors_use_tritonclients_layout() -> None:
    values = np.array([b"one", b"", b"trois"], dtype=object)
    blob = serialize_byte_tensor(values).item()
    decoded = tensors.decode_binary("s", "BYTES", [3], memoryview(blob))
    assert decoded.tolist() == [b"one", b"", b"trois"]
    assert deserialize_bytes_tensor(tensors.encode_binary(decoded)).tolist() == [b"one", b"", b"trois"]
    with pytest.raises(InvalidInput, match="cut short"):
        tensors.decode_binary("s", "BYTES", [3], memoryview(blob[:-1]))
    with pytest.raises(InvalidInput, match="holds 2 values but the binary data has 3"):
        tensors.decode_binary("s", "BYTES", [2], memoryview(blob))


def _request(*inputs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(inputs)


def _binary(name: str, array: np.ndarray, size: int | None = None) -> dict[str, Any]:
    blob = array.tobytes()
    return {
        "name": name,
        "datatype": tensors.datatype_of(array.dtype),
        "shape": list(array.shape),
        "parameters": {"binary_data_size": len(blob) if size is None else size},
    }


def test_decode_inputs_json_and_binary() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header, binary = tensors.split_body(b'{"a": 1}' + x.tobytes(), "8")
    assert bytes(header) == b'{"a": 1}' and bytes(binary) == x.tobytes()
    arrays = tensors.decode_inputs([X], [_binary("input", x)], binary)
    assert np.array_equal(arrays["input"], x) and arrays["input"].flags.writeable
    arrays = tensors.decode_inputs(
        [X, IDS],
        [
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": [7, 8]},
            {"name": "input", "datatype": "FP64", "shape": [2, 4], "data": x.ravel().tolist()},
        ],
        memoryview(b""),
    )
    assert list(arrays) == ["input", "ids"]  # signature order
    assert arrays["input"].dtype == np.float32 and arrays["ids"].tolist() == [7, 8]


def test_ints_are_valid_floats_but_not_the_reverse() -> None:
    ints = {"name": "input", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}
    assert tensors.decode_inputs([X], [ints], memoryview(b""))["input"].dtype == np.float32
    floats = {"name": "ids", "datatype": "FP32", "shape": [1], "data": [1.0]}
    with pytest.raises(InvalidInput, match="expected int64 values, got float32"):
        tensors.decode_inputs([IDS], [floats], memoryview(b""))


X1 = np.ones((1, 4), dtype=np.float32)
GOOD = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("inputs", "binary", "fragment"),
    [
        ([{**GOOD, "name": "x"}], b"", "unknown input 'x'; the model takes ['input']"),
        ([GOOD, GOOD], b"", "given twice"),
        ([], b"", "non-empty list"),
        (None, b"", "non-empty list"),
        (["input"], b"", "inputs[0] must be an object"),
        ([{**GOOD, "datatype": "FLOAT32"}], b"", "datatype 'FLOAT32' is not one of"),
        ([{**GOOD, "datatype": "BYTES", "data": ["a", "b", "c", "d"]}], b"", "expected float32 values"),
        ([{**GOOD, "shape": [-1, 4]}], b"", "shape must be a list of non-negative integers"),
        ([{**GOOD, "shape": [4]}], b"", "expected shape [-1, 4] (rows first), got [4]"),
        ([{k: v for k, v in GOOD.items() if k != "data"}], b"", "neither 'data' nor"),
        ([_binary("input", X1, 32)], X1.tobytes(), "binary_data_size 32 goes past the 16 bytes"),
        ([_binary("input", X1)], X1.tobytes() + b"\0", "add up to 16 bytes but 17 bytes"),
        ([GOOD], X1.tobytes(), "add up to 0 bytes but 16 bytes"),
        (
            [{**_binary("input", X1), "shape": [2, 4]}],
            X1.tobytes(),
            "needs 32 bytes but binary_data_size is 16",
        ),
        ([_binary("input", X1, -1)], b"", "binary_data_size must be a non-negative integer"),
        ([{**GOOD, "parameters": [1]}], b"", "parameters must be an object"),
        (
            [_binary("input", np.full((1, 4), np.nan, np.float32))],
            np.full(4, np.nan, np.float32).tobytes(),
            "NaN",
        ),
    ],
)
def test_bad_inputs(inputs: Any, binary: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        tensors.decode_inputs([X], inputs, memoryview(bytearray(binary)))
    assert fragment in info.value.message


def test_missing_input() -> None:
    with pytest.raises(InvalidInput, match=r"missing input\(s\) \['ids'\]"):
        tensors.decode_inputs([X, IDS], [GOOD], memoryview(b""))


@pytest.mark.parametrize(
    ("length", "fragment"), [("x", "not an integer"), ("0", "outside"), ("99", "outside"), ("-1", "outside")]
)
def test_bad_header_length(length: str, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        tensors.split_body(b"{}" + b"\0" * 4, length)


def test_encode_json_is_flat_row_major() -> None:
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert tensors.encode_json(out).tolist() == [0, 1, 2, 3, 4, 5]
    assert tensors.encode_json(out.T).tolist() == [0, 3, 1, 4, 2, 5]
    assert tensors.encode_json(np.array([[b"a"], [b"\xff"]], dtype=object)) == ["a", "\ufffd"]
    assert struct.unpack("<I", tensors.encode_binary(np.array(["ab"], dtype=object))[:4]) == (2,)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        # The declared datatype's own words (the same checks as the signature's, in this protocol's words)
        ("FP32", ["a", 1], "input 'input': datatype FP32 but 'data' holds strings"),
        (
            "FP32",
            [None, 1],
            "input 'input': datatype FP32 but 'data' holds null, out-of-range or mixed values",
        ),
        ("INT8", [300], "input 'input': a value is out of range for INT8"),
        ("FP16", [1e6], "input 'input': a value is too large for FP16"),
        ("FP16", [70000], "input 'input': a value is too large for FP16"),  # integers too, here
    ],
)
def test_declared_datatype_words(datatype: str, data: list[Any], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        tensors.decode_json("input", datatype, [len(data)], data)
    assert (info.value.message, info.value.details) == (message, {"input": "input"})


@pytest.mark.parametrize(
    ("datatype", "dtype"), [("FP32", np.float32), ("FP64", np.float64), ("FP16", np.float16)]
)
def test_decoded_floats_become_arrays_of_their_own(datatype: str, dtype: type) -> None:
    values = np.arange(8, dtype=np.float64).reshape(2, 4)
    values.flags.writeable = False  # as simdjson's buffer may be
    data = DecodedArray(values, lambda: values.tolist())
    array = tensors.decode_json("x", datatype, [2, 4], data)
    assert array.dtype == dtype and array.flags.writeable and not np.shares_memory(array, values)
    assert array.tolist() == values.tolist()


@pytest.mark.parametrize("datatype", ["INT64", "UINT64"])
@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8])
def test_an_empty_integer_tensor_narrowed_to_the_model_s_type_is_no_server_error(
    datatype: str, dtype: type
) -> None:
    """A [1, 0] tensor had numpy reduce an empty array (min/max) while checking the range: a 500."""
    from service.runtime.base import TensorSpec

    spec = [TensorSpec("x", np.dtype(dtype), (-1, -1))]
    for body, blob in (
        ([{"name": "x", "datatype": datatype, "shape": [1, 0], "data": []}], b""),
        ([{"name": "x", "datatype": datatype, "shape": [1, 0], "parameters": {"binary_data_size": 0}}], b""),
    ):
        arrays = tensors.decode_inputs(spec, body, memoryview(blob))
        assert arrays["x"].shape == (1, 0) and arrays["x"].dtype == np.dtype(dtype)
