"""The committed descriptor module is what grpcio-tools' protoc makes of ``grpc_predict_v2.proto`` today,
and its interface is the Open Inference Protocol's: the service, method and field names and numbers
that Triton's client (its own generated classes, ``tritonclient.grpc.service_pb2``) puts on the wire."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2

from service.grpc import generate, messages


def test_the_committed_descriptor_module_is_regenerated_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "grpc_predict_v2_descriptor.py"
    assert generate.main([str(target)]) == 0
    committed = generate.MODULE.read_text()
    assert target.read_text() == committed, (
        "service/grpc/grpc_predict_v2_descriptor.py is stale: run python -m service.grpc.generate"
    )


def test_a_changed_proto_changes_the_module(tmp_path: Path) -> None:
    """The check above can fail: one field renumbered gives another descriptor."""
    changed = tmp_path / "grpc_predict_v2.proto"
    changed.write_text(generate.PROTO.read_text().replace("bool live = 1;", "bool live = 2;"))
    assert generate.module_text(generate.descriptor(changed)) != generate.MODULE.read_text()


NEWER_THAN_TRITON = ("ModelMetadataResponse.properties", "ModelMetadataResponse.PropertiesEntry")
"""Fields of the open specification that Triton's proto does not have (Ferry leaves them empty)."""


def fields(descriptor: object) -> set[tuple[str, int, int, int]]:
    """(path, number, type, label) of every field of a message and its nested messages."""
    out: set[tuple[str, int, int, int]] = set()
    for field in descriptor.fields:  # type: ignore[attr-defined]
        out.add((field.full_name.split(".", 1)[1], field.number, field.type, field.label))
    for nested in descriptor.nested_types:  # type: ignore[attr-defined]
        out |= fields(nested)
    return out


@pytest.mark.parametrize("method", sorted(messages.METHODS))
def test_every_method_matches_triton_s_wire_format(method: str) -> None:
    ours = messages.METHODS[method]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[method]
    assert theirs.containing_service.full_name == messages.SERVICE
    for our_class, their_type in zip(ours, (theirs.input_type, theirs.output_type), strict=True):
        assert our_class.DESCRIPTOR.full_name == their_type.full_name
        # Triton's messages may carry more fields (its own extensions); every one of ours is theirs but
        # the model properties the open specification added after Triton's copy.
        ours_on_wire = {f for f in fields(our_class.DESCRIPTOR) if not f[0].startswith(NEWER_THAN_TRITON)}
        assert ours_on_wire <= fields(their_type)


def test_the_classes_live_in_a_pool_of_their_own() -> None:
    """Triton's generated module and Ferry's classes are both loaded in this process."""
    assert service_pb2.ModelInferRequest is not messages.ModelInferRequest
    request = messages.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01\x02"])
    request.inputs.add(name="x", datatype="UINT8", shape=[1, 2])
    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert (theirs.model_name, theirs.inputs[0].name, list(theirs.inputs[0].shape)) == ("m", "x", [1, 2])
