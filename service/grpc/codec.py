"""``ModelInfer`` as a ``Call`` of the pipeline, and its ``Answer`` as a ``ModelInferResponse``.

Decoding is REST v2's own (``service/api/tensors.py``, then the signature's and the columns' checks): each
input is handed over as the tensor REST would hold, its typed ``contents`` as JSON's ``data`` and its
``raw_input_contents`` entry (or typed ``BYTES``, length-prefixed) as binary data of that size. So what is
refused, and the words that name the input, are the same in both transports; only the field names in the
messages are gRPC's.

The answer is raw (``raw_output_contents``, as Triton's server always answers) when the request sent raw
inputs, asked for binary outputs (``binary_data_output``, or an output's ``binary_data``), or an output has
no typed field (FP16); otherwise typed ``contents``, as a KServe or MLServer client that sent typed inputs
expects.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.api import tensors
from service.api.protocols.v2 import _selection as output_selection
from service.batcher import Probe
from service.errors import InvalidInput
from service.grpc import messages
from service.pipeline import Answer, Call, Decoded
from service.registry import LoadedModel
from service.signature import shared_rows

CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The field of ``InferTensorContents`` that holds each datatype's values (FP16: none, raw only)."""
_WIDE = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int64),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint64),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
"""What a typed field's values are read into; ``tensors.decode_json`` then casts to the datatype, refusing
values out of its range (a 300 in ``int_contents`` for INT8)."""
_TRANSPORT = frozenset({"binary_data_output"})
"""Request parameters about the answer's encoding: not model parameters, not part of the cache key."""
_WORDS = (
    ("'data'", "contents"),
    ("binary_data_size is", "its raw_input_contents entry holds"),
    ("the binary data has", "its raw_input_contents entry has"),
)
"""REST's field names in the shared decoder's messages, in gRPC's words."""
_U32 = struct.Struct("<I")


def call_of(
    request: Any,
    *,
    deadline: float | None = None,
    gone: Probe | None = None,
    cache: str | None = None,
    key: str | None = None,
) -> Call:
    """The pipeline's call for a ``ModelInferRequest``; its inputs are decoded against the version that
    answers, as REST's are."""

    def decode(model: LoadedModel) -> Decoded:
        parameters = parameters_of(request.parameters)
        default_binary = parameters.get("binary_data_output") is True
        raw = len(request.raw_input_contents) > 0
        inputs, binary = _inputs(request, raw)
        try:
            arrays = tensors.decode_inputs(model.inputs, inputs, binary)
            requested = [{"name": o.name, "parameters": parameters_of(o.parameters)} for o in request.outputs]
            selection = output_selection(requested, model.outputs, default_binary)
        except InvalidInput as exc:
            raise _reworded(exc) from None
        params = {k: v for k, v in parameters.items() if k not in _TRANSPORT} or None
        return Decoded(arrays, shared_rows(arrays), params, (request.id, selection, default_binary, raw))

    return Call(
        request.model_name or None,
        "grpc",
        decode,
        version=request.model_version or None,
        cache=cache,
        gone=gone,
        deadline=deadline,
        key=key,
    )


def response_of(answer: Answer) -> Any:
    """The ``ModelInferResponse`` of an answer: the selected outputs, raw or typed (module docstring)."""
    request_id, selection, default_binary, raw_inputs = answer.extra
    chosen = selection if selection is not None else [(n, default_binary) for n in answer.outputs]
    outputs = []
    for name, _ in chosen:
        array = answer.outputs.get(name)
        if array is None:
            raise InvalidInput(f"unknown output {name!r}; the model produced {sorted(answer.outputs)}")
        outputs.append((name, array, tensors.datatype_of(array.dtype)))
    raw = raw_inputs or any(binary for _, binary in chosen) or any(d not in CONTENTS for *_, d in outputs)
    response = messages.ModelInferResponse(
        model_name=answer.model, model_version=answer.version, id=request_id
    )
    for name, array, datatype in outputs:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(tensors.encode_binary(array))
        elif datatype == "BYTES":
            values = array.reshape(-1).tolist()
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in values
            )
        else:
            getattr(tensor.contents, CONTENTS[datatype]).extend(array.reshape(-1).tolist())
    if answer.form.kind == "frame":  # MLServer's pandas codec: the outputs are a DataFrame's columns
        response.parameters["content_type"].string_param = "pd"
    return response


def parameters_of(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values (an unset parameter as ``None``)."""
    out: dict[str, Any] = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        out[key] = getattr(parameter, which) if which is not None else None
    return out


def _inputs(request: Any, raw: bool) -> tuple[list[dict[str, Any]], memoryview]:
    """The request's inputs as REST's tensors (``tensors.decode_inputs``) and the binary data they
    refer to, in input order."""
    if raw and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(request.raw_input_contents)} entries but the request has "
            f"{len(request.inputs)} inputs: either every input is raw, in the order of inputs, or none",
            field="raw_input_contents",
        )
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
        typed = tensor.HasField("contents")
        if raw:
            if typed:
                raise InvalidInput(
                    f"input {name!r} has contents while the request sends raw_input_contents", input=name
                )
            blob = request.raw_input_contents[index]
        elif not typed and (datatype in CONTENTS or datatype == "FP16"):
            raise InvalidInput(f"input {name!r} has neither contents nor raw_input_contents", input=name)
        else:
            blob = _typed(name, datatype, tensor.contents, entry)
        if blob is not None:
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        inputs.append(entry)
    return inputs, memoryview(bytearray(b"".join(blobs)))  # writable, as REST's binary data is


def _typed(name: str, datatype: str, contents: Any, entry: dict[str, Any]) -> bytes | None:
    """Put a tensor's typed values in ``entry["data"]``; typed ``BYTES`` become binary data instead (the
    bytes returned), as REST's binary ``BYTES`` (JSON has only strings)."""
    field = CONTENTS.get(datatype)
    filled = [f.name for f, _ in contents.ListFields()]
    if field is None:  # FP16, or a datatype that is none (decode_inputs names the datatypes)
        if datatype == "FP16":
            raise InvalidInput(f"input {name!r}: FP16 has no typed contents; send it in raw_input_contents")
        entry["data"] = []
        return None
    strays = [f for f in filled if f != field]
    if strays:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} takes its values in contents.{field}, not {strays}",
            input=name,
        )
    values = getattr(contents, field)
    if field == "bytes_contents":
        return b"".join(part for value in values for part in (_U32.pack(len(value)), value))
    entry["data"] = np.fromiter(values, dtype=_WIDE[field], count=len(values))
    return None


def _reworded(exc: InvalidInput) -> InvalidInput:
    message = exc.message
    for rest, grpc in _WORDS:
        message = message.replace(rest, grpc)
    if message == exc.message:
        return exc
    return type(exc)(message, **exc.details)
