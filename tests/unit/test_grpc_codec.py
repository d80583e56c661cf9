"""The gRPC server in process: ``create_app`` with a fake registry (exact, instant models) and
``FERRY_GRPC_PORT=0``, its lifespan run here, called over a real gRPC channel on loopback. What REST v2
refuses, gRPC refuses with the same words (its field names aside) and the status code of REST's status;
the typed fields are read as their datatypes ask; parameters reach the model; the concurrency cap spares
the probes. tests/integration/test_grpc.py runs the same server as a real process with real models."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest
import pytest_asyncio

from fakes import Doubler, FakeRegistry
from service.api.app import create_app
from service.config import Settings
from service.grpc import messages
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRef
from service.runtime.base import RuntimeInfo, TensorSpec

pytestmark = pytest.mark.asyncio


class Held(Doubler):
    """A doubler that waits for ``release`` while ``hold`` is set."""

    def __init__(self, factor: float) -> None:
        super().__init__(factor)
        self.hold, self.release, self.entered = threading.Event(), threading.Event(), threading.Event()

    def predict_batch(self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None) -> Any:
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return super().predict_batch(inputs, params)


class HeldRegistry(FakeRegistry):
    def load(self, name: str, ref: ModelRef) -> LoadedModel:
        loaded = super().load(name, ref)
        held = Held(float(ref.version))
        self.runtimes[name] = held
        return dataclasses.replace(loaded, runtime=held)


class Served:
    def __init__(self, app: Any, registry: HeldRegistry, metrics: Metrics, rest: httpx.AsyncClient) -> None:
        self.app, self.registry, self.metrics, self.rest = app, registry, metrics, rest
        self.port: int = app.state.grpc_server.port

    async def call(self, method: str, request: Any, deadline_s: float = 10) -> Any:
        request_class, response_class = messages.METHODS[method]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            rpc = channel.unary_unary(
                f"/{messages.SERVICE}/{method}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            return await rpc(request, timeout=deadline_s)

    async def refused(self, method: str, request: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await self.call(method, request)
        return error.value


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    registry = HeldRegistry(version="2")
    metrics = Metrics(process=False)
    settings = Settings(
        models=["m=models:/m@champion"],
        grpc_port=0,
        limits={"max_rows": 8, "max_concurrency": 1},
        reload={"poll_s": 0},
        cache={"enabled": False},
    )
    app = create_app(settings, metrics, registry)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.pipeline.models.ready():
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as rest:
            yield Served(app, registry, metrics, rest)


def request_of(datatype: str, shape: list[int], field: str | None, values: list[Any], **kw: Any) -> Any:
    request = messages.ModelInferRequest(model_name="m", **kw)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    if field is not None:
        getattr(tensor.contents, field).extend(values)
    return request


async def test_typed_and_raw_answers(served: Served) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    typed = await served.call("ModelInfer", request_of("FP32", [3, 2], "fp32_contents", x.ravel().tolist()))
    [out] = typed.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [3, 2])
    assert list(out.contents.fp32_contents) == (x * 2).ravel().tolist() and not typed.raw_output_contents
    raw = messages.ModelInferRequest(model_name="m", raw_input_contents=[x.astype("<f2").tobytes()])
    raw.inputs.add(name="x", datatype="FP16", shape=[3, 2])  # FP16 has raw contents only
    answer = await served.call("ModelInfer", raw)
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(3, 2), x * 2)


async def test_integer_fields_are_read_as_their_datatype(served: Served) -> None:
    answer = await served.call("ModelInfer", request_of("INT8", [1, 2], "int_contents", [-3, 100]))
    assert list(answer.outputs[0].contents.fp32_contents) == [-6.0, 200.0]
    error = await served.refused("ModelInfer", request_of("INT8", [1, 2], "int_contents", [300, 1]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in error.details() and "out of range for INT8" in error.details()


async def test_parameters_reach_the_model_and_the_id_is_echoed(served: Served) -> None:
    request = request_of("FP32", [1, 2], "fp32_contents", [1.0, 2.0], id="abc")
    request.parameters["scale"].double_param = 3.0
    answer = await served.call("ModelInfer", request)
    assert answer.id == "abc" and list(answer.outputs[0].contents.fp32_contents) == [6.0, 12.0]


BAD = [
    # (REST v2 input tensor, gRPC datatype, shape, field, values)
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, "FP32", [2, 2], "fp32_contents", [1, 2, 3]),
    ({"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}, "FP32", [1, 3], "fp32_contents", [1, 2, 3]),
    ({"name": "x", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}, "BOOL", [1, 2], "bool_contents", [True, False]),
    ({"name": "x", "datatype": "FP99", "shape": [1, 2], "data": [1, 2]}, "FP99", [1, 2], None, []),
    ({"name": "x", "datatype": "FP32", "shape": [1, -2], "data": [1, 2]}, "FP32", [1, -2], "fp32_contents", [1, 2]),
    ({"name": "z", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}, "FP32", [1, 2], "fp32_contents", [1, 2]),
    ({"name": "x", "datatype": "FP32", "shape": [9, 2], "data": [1.0] * 18}, "FP32", [9, 2], "fp32_contents", [1.0] * 18),
]  # fmt: skip
"""Refused alike in both transports: a count that does not fill the shape, a shape the model does not
take, a datatype the model does not take, no such datatype, a negative axis, an unknown input, more rows
than FERRY_LIMITS__MAX_ROWS."""


@pytest.mark.parametrize(("rest", "datatype", "shape", "field", "values"), BAD, ids=lambda v: None)
async def test_grpc_refuses_what_rest_refuses_in_the_same_words(
    served: Served,
    rest: dict[str, Any],
    datatype: str,
    shape: list[int],
    field: str | None,
    values: list[Any],
) -> None:
    r = await served.rest.post("/v2/models/m/infer", json={"inputs": [rest]})
    assert r.status_code in (400, 413), r.text
    request = request_of(datatype, shape, field, values)
    request.inputs[0].name = rest["name"]
    error = await served.refused("ModelInfer", request)
    want = grpc.StatusCode.RESOURCE_EXHAUSTED if r.status_code == 413 else grpc.StatusCode.INVALID_ARGUMENT
    assert error.code() == want
    assert error.details() == r.json()["error"].replace("'data'", "contents")


async def test_the_cap_refuses_a_second_call_but_not_the_probes(served: Served) -> None:
    held = served.registry.runtimes["m"]
    assert isinstance(held, Held)
    held.hold.set()
    first = asyncio.create_task(
        served.call("ModelInfer", request_of("FP32", [1, 2], "fp32_contents", [1, 2]))
    )
    try:
        assert await asyncio.to_thread(held.entered.wait, 10)
        error = await served.refused("ModelInfer", request_of("FP32", [1, 2], "fp32_contents", [1, 2]))
        assert (
            error.code() == grpc.StatusCode.UNAVAILABLE and "FERRY_LIMITS__MAX_CONCURRENCY" in error.details()
        )
        assert dict(error.trailing_metadata() or ()).get("retry-after") == "1"
        assert (await served.call("ServerReady", messages.ServerReadyRequest())).ready
    finally:
        held.release.set()
    assert list((await first).outputs[0].contents.fp32_contents) == [2.0, 4.0]
    codes = served.metrics.grpc_requests
    assert codes.labels("ModelInfer", "UNAVAILABLE")._value.get() == 1
    assert codes.labels("ModelInfer", "OK")._value.get() == 1


async def test_the_client_deadline_bounds_the_wait(served: Served) -> None:
    held = served.registry.runtimes["m"]
    assert isinstance(held, Held)
    held.hold.set()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await served.call(
                "ModelInfer", request_of("FP32", [1, 2], "fp32_contents", [1, 2]), deadline_s=0.3
            )
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        held.release.set()


async def test_metadata_and_readiness(served: Served) -> None:
    meta = await served.call("ModelMetadata", messages.ModelMetadataRequest(name="m"))
    assert (meta.name, list(meta.versions), meta.inputs[0].name, list(meta.inputs[0].shape)) == (
        "m",
        ["2"],
        "x",
        [-1, 2],
    )
    assert (await served.call("ModelReady", messages.ModelReadyRequest(name="m", version="2"))).ready
    assert not (await served.call("ModelReady", messages.ModelReadyRequest(name="m", version="1"))).ready
    assert not (await served.call("ModelReady", messages.ModelReadyRequest(name="nope"))).ready
    error = await served.refused("ModelMetadata", messages.ModelMetadataRequest(name="m", version="1"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'1' is not loaded" in error.details()


# ------------------------------------------------------------------------------------------- a DataFrame model
PLAN = TensorSpec("plan", np.dtype(object), (-1,), column="string")
MONTHS = TensorSpec("months", np.dtype(np.int64), (-1,), column="long")
PAID = TensorSpec("paid", np.dtype(np.bool_), (-1,), column="boolean")


class Frame:
    """A table model: one input per column (MLServer's pandas codec), a string and a number out."""

    info = RuntimeInfo(runtime="fake", device="cpu")

    def predict_batch(self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None) -> Any:
        plans = np.array([f"{p}-{'paid' if ok else 'due'}" for p, ok in zip(inputs["plan"], inputs["paid"])])
        return {"label": plans.astype(object), "months": inputs["months"] * 2}

    def close(self) -> None:
        pass


class FrameRegistry(FakeRegistry):
    def load(self, name: str, ref: ModelRef) -> LoadedModel:
        example = {
            "plan": np.array(["basic"], dtype=object),
            "months": np.array([1], dtype=np.int64),
            "paid": np.array([True]),
        }
        outputs = [
            TensorSpec("label", np.dtype(object), (-1,)),
            TensorSpec("months", np.dtype(np.int64), (-1,)),
        ]
        return LoadedModel(name, ref, "pyfunc", Frame(), [PLAN, MONTHS, PAID], outputs, example)


async def test_a_table_model_takes_typed_columns_as_rest_takes_them() -> None:
    settings = Settings(
        models=["t=models:/t@champion"], grpc_port=0, reload={"poll_s": 0}, cache={"enabled": False}
    )
    app = create_app(settings, Metrics(process=False), FrameRegistry())  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.pipeline.models.ready():
                break
            await asyncio.sleep(0.01)
        request = messages.ModelInferRequest(model_name="t")
        plan = request.inputs.add(name="plan", datatype="BYTES", shape=[2])
        plan.contents.bytes_contents.extend([b"basic", "pr\u00e9mium".encode()])
        request.inputs.add(name="months", datatype="INT64", shape=[2, 1]).contents.int64_contents.extend(
            [3, 12]
        )
        request.inputs.add(name="paid", datatype="BOOL", shape=[2]).contents.bool_contents.extend(
            [True, False]
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_server.port}") as channel:
            infer = channel.unary_unary(
                f"/{messages.SERVICE}/ModelInfer",
                request_serializer=messages.ModelInferRequest.SerializeToString,
                response_deserializer=messages.ModelInferResponse.FromString,
            )
            answer = await infer(request, timeout=10)
            outputs = {o.name: o for o in answer.outputs}
            assert [v.decode() for v in outputs["label"].contents.bytes_contents] == [
                "basic-paid",
                "pr\u00e9mium-due",
            ]
            assert list(outputs["months"].contents.int64_contents) == [6, 24]
            rest_inputs = [
                {"name": "plan", "datatype": "BYTES", "shape": [2], "data": ["basic", "pr\u00e9mium"]},
                {"name": "months", "datatype": "INT64", "shape": [2, 1], "data": [3, 12]},
                {"name": "paid", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            ]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as rest:
                r = await rest.post("/v2/models/t/infer", json={"inputs": rest_inputs})
                missing = await rest.post("/v2/models/t/infer", json={"inputs": rest_inputs[:2]})
            assert {o["name"]: o["data"] for o in r.json()["outputs"]} == {
                "label": ["basic-paid", "pr\u00e9mium-due"],
                "months": [6, 24],
            }
            del request.inputs[2]  # a required column left out: named, as REST names it
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await infer(request, timeout=10)
            r = missing
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details() == r.json()["error"] and "paid" in error.value.details()
