"""``python -m service.grpc.generate``: compile ``grpc_predict_v2.proto`` with grpcio-tools' protoc (a dev
dependency) and write its descriptor, serialized, into ``grpc_predict_v2_descriptor.py``, from which
``service.grpc.messages`` builds the message classes. ``tests/unit/test_grpc_proto.py`` runs this into a
temporary folder and fails when the committed module differs."""

from __future__ import annotations

import base64
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "grpc_predict_v2.proto"
MODULE = HERE / "grpc_predict_v2_descriptor.py"
_WIDTH = 96
"""Base64 characters of the descriptor per line of the module."""


def descriptor(proto: Path = PROTO) -> bytes:
    """The ``FileDescriptorProto`` of ``proto``, serialized deterministically."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="ferry-proto-") as tmp:
        out = Path(tmp) / "set.binpb"
        argv = ["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc could not compile {proto}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    [file] = files
    return bytes(file.SerializeToString(deterministic=True))


def module_text(serialized: bytes) -> str:
    """A Python module holding ``serialized`` as base64 lines (the layout ``ruff format`` keeps)."""
    encoded = base64.b64encode(serialized).decode()
    lines = "".join(f'    "{encoded[i : i + _WIDTH]}"\n' for i in range(0, len(encoded), _WIDTH))
    return (
        '"""The serialized ``FileDescriptorProto`` of ``grpc_predict_v2.proto``. Written by\n'
        '``python -m service.grpc.generate`` (grpcio-tools\' protoc); do not edit."""\n'
        "\n"
        "import base64\n"
        "\n"
        f"FILE_DESCRIPTOR = base64.b64decode(\n{lines})\n"
    )


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else MODULE
    target.write_text(module_text(descriptor()))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
