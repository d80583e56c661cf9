"""Open Inference Protocol (KServe v2) wire models, as the specification defines them.

They document the API (OpenAPI at ``/docs``); the inference route parses bodies with orjson and the
tensor codec of ``service.api.tensors`` instead, which is several times cheaper.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Datatype = str
"""BOOL, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FP16, FP32, FP64 or BYTES."""


class RequestInput(BaseModel):
    name: str = Field(description="Input name, as the model metadata lists it.", examples=["input"])
    shape: list[int] = Field(description="Full shape of the batch, rows first.", examples=[[1, 4]])
    datatype: Datatype = Field(description="Element datatype.", examples=["FP32"])
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size: bytes of this tensor after the JSON header."
    )
    data: list[Any] | None = Field(
        default=None,
        description="Elements, flat row-major or nested; absent when sent as binary data.",
        examples=[[1.0, 2.0, 3.0, 4.0]],
    )


class RequestOutput(BaseModel):
    name: str = Field(description="Output to return.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: true returns this output as raw bytes after the JSON."
    )


class InferenceRequest(BaseModel):
    id: str | None = Field(default=None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="binary_data_output: true returns every output as binary; others pass to the model.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(default=None, description="Outputs to return (default: all).")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size when the output follows the JSON as raw bytes."
    )
    data: list[Any] | None = Field(default=None, description="Elements, flat row-major.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a variable axis (the batch axis first).")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The loaded version.")
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, naming the input or field.")


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` substituted in place, for an OpenAPI request body
    (references to ``#/$defs`` do not resolve inside the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
