"""The message classes of ``inference.GRPCInferenceService``, built at import time from the committed
descriptor (``grpc_predict_v2_descriptor.py``, compiled from ``grpc_predict_v2.proto``) in a descriptor pool
of Ferry's own.

Not protoc's ``_pb2`` modules: those register ``inference.*`` in protobuf's process-wide pool, and so do
Triton's client (``tritonclient.grpc``) and KServe's, with the same message names from another file, so
whichever is imported second fails ("duplicate symbol 'inference.ServerLiveRequest'"). A pool of our own
lets a model, a plugin or a test load those clients in the same process. The wire format is the same.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from service.grpc.grpc_predict_v2_descriptor import FILE_DESCRIPTOR

SERVICE = "inference.GRPCInferenceService"
"""The full name of the service, the prefix of every method's path."""

_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR))


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
InferParameter = _message("InferParameter")
InferTensorContents = _message("InferTensorContents")

METHODS: dict[str, tuple[Any, Any]] = {
    method.name: (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )
    for method in _POOL.FindServiceByName(SERVICE).methods
}
"""Each method of the service: ``name -> (request class, response class)``, from the descriptor."""
