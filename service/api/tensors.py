"""The Open Inference Protocol's tensor codec: v2 datatypes, JSON and binary tensor data, to and from numpy.

A request body is a JSON header, optionally followed by raw tensor bytes (the binary tensor data
extension: the ``Inference-Header-Content-Length`` header gives the JSON part's length, each binary
input carries ``parameters.binary_data_size``, in input order). Binary data is little-endian and
row-major; ``BYTES`` elements are each a 4-byte little-endian length followed by the bytes; ``BOOL`` is
one byte per element. Problems are ``InvalidInput`` (about one tensor: its name is in the message) or
``BadRequest`` (about the body); both are 400 in this protocol's error body.

What is the protocol's own is here: a tensor's fields, the binary data's layout, and whether JSON ``data``
fits the tensor's declared datatype. The checks themselves (kinds, integer ranges, float overflow) and
the dtype table are ``service.signature``'s, which then checks each tensor against the model's signature.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.columns import column_array
from service.errors import BadRequest, InvalidInput
from service.runtime.base import TensorSpec
from service.signature import (
    DATATYPES,
    DecodedArray,
    Wording,
    cast,
    check_array,
    check_kind,
    datatype_of,
    json_array,
)

__all__ = [
    "DATATYPES",
    "datatype_of",
    "decode_binary",
    "decode_inputs",
    "decode_json",
    "encode_binary",
    "encode_json",
    "split_body",
]

V2 = Wording(
    label=datatype_of,
    kind="input {name!r}: datatype {label} but 'data' holds {got}",
    received={"U": "strings", "O": "null, out-of-range or mixed values"},
    out_of_range="input {name!r}: a value is out of range for {label}",
    too_large="input {name!r}: a value is too large for {label}",
    int_overflow=True,
)
"""The words of a check of JSON ``data`` against the tensor's declared datatype (``check_array`` then
checks the result against the signature, in Ferry's words)."""

_U32 = struct.Struct("<I")


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header and the binary part of a request body (a writable buffer, no copy per tensor)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if not 0 < length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {length} is outside the body's {len(body)} bytes")
    buffer = memoryview(bytearray(body))
    return buffer[:length], buffer[length:]


def decode_inputs(specs: Sequence[TensorSpec], tensors: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """The request's ``inputs`` to arrays checked against the model's signature, in signature order."""
    if not isinstance(tensors, list) or not tensors:
        raise InvalidInput("field 'inputs' must be a non-empty list of tensors", field="inputs")
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Mapping):
            raise InvalidInput(f"inputs[{index}] must be an object with name, datatype, shape and data")
        raw_name = tensor.get("name")
        spec = by_name.get(raw_name) if isinstance(raw_name, str) else None
        if spec is None and (specs or not isinstance(raw_name, str)):  # no signature: any named input
            raise InvalidInput(
                f"unknown input {raw_name!r}; the model takes {sorted(by_name)}",
                unknown=raw_name,
                expected=sorted(by_name),
            )
        name = spec.name if spec is not None else str(raw_name)
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice", input=name)
        datatype, shape = _datatype(name, tensor.get("datatype")), _shape(name, tensor.get("shape"))
        size = _parameters(f"input {name!r}", tensor.get("parameters")).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} goes past the {len(binary)} bytes of binary "
                    f"data after the JSON header (Inference-Header-Content-Length)",
                    input=name,
                )
            array = decode_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            array = decode_json(name, datatype, shape, tensor["data"])
        else:
            raise InvalidInput(
                f"input {name!r} has neither 'data' nor parameters.binary_data_size", input=name
            )
        if spec is None:
            arrays[name] = array
        elif spec.column is not None:  # a DataFrame column (MLServer's pandas codec: one input each)
            arrays[name] = column_array(spec, array)
        else:  # JSON cannot carry NaN or infinity; refuse them in binary data alike
            arrays[name] = check_array(spec, array, finite=size is not None)
    if offset != len(binary):
        raise InvalidInput(
            f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} bytes of binary data "
            "follow the JSON header"
        )
    missing = [s.name for s in specs if s.required and s.name not in arrays]
    if missing:
        raise InvalidInput(f"missing input(s) {missing}", missing=missing)
    return {s.name: arrays[s.name] for s in specs if s.name in arrays} if specs else arrays


def decode_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """JSON ``data`` (flat row-major, or nested to ``shape``) to an array of ``datatype`` and ``shape``."""
    dtype = DATATYPES[datatype]
    numbers = False
    if isinstance(data, DecodedArray):  # numbers read straight to float64 (api/jsonbody.py)
        if dtype.kind == "f":  # narrowed to a new array below; float64 is copied (writable, its own)
            data = data.values if dtype.itemsize < 8 else data.values.copy()
        else:
            data, numbers = data.original(), True
    if not isinstance(data, (list, np.ndarray)):
        raise InvalidInput(f"input {name!r}: 'data' must be a list, got {type(data).__name__}", input=name)
    count = math.prod(shape)
    try:
        if datatype == "BYTES":
            array = np.array(data, dtype=object)
        else:
            array = data if isinstance(data, np.ndarray) else json_array(data, guard=not numbers)
    except ValueError:
        raise InvalidInput(f"input {name!r}: nested 'data' is ragged", input=name) from None
    if array.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} holds {count} values but 'data' has {array.size}",
            input=name,
            expected=count,
            received=int(array.size),
        )
    array = array.reshape(shape)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in array.flat):
            raise InvalidInput(f"input {name!r}: BYTES data must be strings", input=name)
        return array
    if count == 0:
        return array.astype(dtype)
    check_kind(name, array, dtype, V2)
    return cast(name, array, dtype, V2)


def decode_binary(name: str, datatype: str, shape: list[int], blob: memoryview) -> np.ndarray:
    """Raw little-endian bytes (or length-prefixed ``BYTES`` elements) to an array of ``shape``."""
    count = math.prod(shape)
    if datatype == "BYTES":
        values: list[bytes] = []
        offset = 0
        while offset < len(blob):
            if offset + 4 > len(blob):
                raise InvalidInput(f"input {name!r}: BYTES element {len(values)} is cut short", input=name)
            (length,) = _U32.unpack_from(blob, offset)
            if offset + 4 + length > len(blob):
                raise InvalidInput(f"input {name!r}: BYTES element {len(values)} is cut short", input=name)
            values.append(bytes(blob[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        if len(values) != count:
            raise InvalidInput(
                f"input {name!r}: shape {shape} holds {count} values but the binary data has {len(values)}",
                input=name,
            )
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    if len(blob) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes but "
            f"binary_data_size is {len(blob)}",
            input=name,
            expected=count * dtype.itemsize,
            received=len(blob),
        )
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def encode_json(array: np.ndarray) -> Any:
    """Flat row-major ``data`` for a JSON response (a numpy array, which orjson writes natively)."""
    if array.dtype.kind in "biuf":
        return np.ascontiguousarray(array).reshape(-1)
    return [
        v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1).tolist()
    ]


def encode_binary(array: np.ndarray) -> bytes:
    """Raw bytes of an output (little-endian; ``BYTES`` elements length-prefixed)."""
    if array.dtype.kind in "biuf":
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts: list[bytes] = []
    for value in array.reshape(-1).tolist():
        data = value if isinstance(value, bytes) else str(value).encode()
        parts += (_U32.pack(len(data)), data)
    return b"".join(parts)


def _datatype(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: datatype {value!r} is not one of {list(DATATYPES)}",
            input=name,
            field="datatype",
        )
    return str(value)


MAX_RANK = 32
"""Most axes a tensor may declare (numpy's own limit is 64; no served signature comes near either)."""
MAX_DIM = 2**31 - 1
"""Largest size of one axis: beyond it a declared shape cannot describe data that fits a request."""


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(
            f"input {name!r}: shape must be a list of non-negative integers, got {value!r}", input=name
        )
    if len(value) > MAX_RANK or any(d > MAX_DIM for d in value):
        raise InvalidInput(
            f"input {name!r}: shape {value!r} has more than {MAX_RANK} axes or an axis above {MAX_DIM}",
            input=name,
        )
    return value


def _parameters(owner: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{owner}: parameters must be an object")
    return value
