"""The pipeline and every protocol's codec, in process: ``create_app`` with a fake registry (exact,
instant models), driven through httpx's ASGI transport with the app's real lifespan. The same routes
run against real MLflow models and real uvicorn processes in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from fakes import FakeRegistry
from service.api.app import create_app
from service.config import Settings
from service.errors import ClientGone, InvalidInput, ModelNotFound, PayloadTooLarge
from service.metrics import Metrics
from service.pipeline import Call, Decoded
from service.registry import LoadedModel

pytestmark = pytest.mark.asyncio


class App:
    def __init__(self, client: httpx.AsyncClient, registry: FakeRegistry, metrics: Metrics, app: object):
        self.client, self.registry, self.metrics, self.app = client, registry, metrics, app

    def sample(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for family in self.metrics.registry.collect()
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest_asyncio.fixture
async def served() -> AsyncIterator[App]:
    registry = FakeRegistry(version="2")
    metrics = Metrics(process=False)
    settings = Settings(models=["m=models:/m@champion"], limits={"max_rows": 8}, reload={"poll_s": 0})
    app = create_app(settings, metrics, registry)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(500):  # the models load in the background, as in a real start-up
            if app.state.pipeline.models.ready():
                break
            await asyncio.sleep(0.01)
        assert app.state.pipeline.models.ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as client:
            yield App(client, registry, metrics, app)


async def test_each_protocol_answers_through_the_pipeline(served: App) -> None:
    x = [[1.0, 2.0]]
    r = await served.client.post("/predict", json={"inputs": x})
    assert r.status_code == 200 and r.json() == {"model": "m", "version": "2", "outputs": [[2.0, 4.0]]}
    assert r.headers["x-cache"] == "miss" and r.headers["x-model-version"] == "2"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
    r = await served.client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200
    assert r.json()["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [2.0, 4.0]}]
    r = await served.client.post("/invocations", json={"inputs": x})
    assert r.status_code == 200 and r.json() == {"predictions": [[2.0, 4.0]]}
    r = await served.client.post("/invocations", content=b"a,b\n1,2\n", headers={"content-type": "text/csv"})
    assert r.status_code == 200 and r.json() == {"predictions": [[2.0, 4.0]]}
    answered = {
        p: served.sample("ferry_inference_requests_total", protocol=p) for p in ("ferry", "v2", "mlflow")
    }
    assert answered == {"ferry": 1, "v2": 1, "mlflow": 2}


async def test_a_repeat_is_a_cache_hit_and_the_model_runs_once(served: App) -> None:
    body = {"inputs": [[3.0, 4.0]]}
    first = await served.client.post("/predict", json=body, headers={"cache-control": "no-cache"})
    again = await served.client.post("/predict", json=body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert first.content == again.content
    runtime = served.registry.runtimes["m"]
    assert runtime.batches.count(1) == 1, runtime.batches  # the warm-up ran 2 rows, the miss 1


async def test_a_name_re_pointed_to_another_model_with_the_same_version_never_hits_its_entries(
    served: App,
) -> None:
    body = {"inputs": [[5.0, 6.0]]}
    assert (await served.client.post("/predict", json=body)).headers["x-cache"] == "miss"
    assert (await served.client.post("/predict", json=body)).headers["x-cache"] == "hit"
    models = served.app.state.pipeline.models  # type: ignore[attr-defined]
    await models.add("m", "models:/other@champion")  # version "2" as well
    assert models.find("m").active.model.ref.source == "models:/other/2"
    again = await served.client.post("/predict", json=body)
    assert again.headers["x-cache"] == "miss" and again.headers["x-model-version"] == "2"


async def test_invalid_input_is_counted_once_and_named_on_every_protocol(served: App) -> None:
    r = await served.client.post("/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 422 and "x" in r.json()["error"]["message"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
    r = await served.client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 400 and "x" in r.json()["error"]
    r = await served.client.post("/invocations", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert served.sample("ferry_requests_rejected_total", model="m", reason="invalid_input") == 3


async def test_malformed_bodies_are_400_and_not_counted_as_invalid_input(served: App) -> None:
    assert (await served.client.post("/predict", content=b"{")).status_code == 400
    r = await served.client.post("/v2/models/m/infer", content=b"[1]")
    assert r.status_code == 400 and "error" in r.json()
    assert served.sample("ferry_requests_rejected_total", model="m", reason="invalid_input") == 0


async def test_row_limit_version_and_unknown_model(served: App) -> None:
    r = await served.client.post("/predict", json={"inputs": np.ones((9, 2)).tolist()})
    assert r.status_code == 413 and "FERRY_LIMITS__MAX_ROWS" in r.json()["error"]["message"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
    r = await served.client.post("/v2/models/m/versions/7/infer", json=body)
    assert r.status_code == 404 and "version '7' is not loaded" in r.json()["error"]
    assert (await served.client.post("/v2/models/m/versions/2/infer", json=body)).status_code == 200
    r = await served.client.post("/models/nope/predict", json={"inputs": [[1.0, 2.0]]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_the_openapi_document_declares_every_codec_route_once(served: App) -> None:
    paths = (await served.client.get("/openapi.json")).json()["paths"]
    for path in ("/predict", "/models/{name}/predict", "/v2/models/{name}/infer", "/invocations"):
        assert list(paths[path]) == ["post"], path
    assert "requestBody" in paths["/v2/models/{name}/infer"]["post"]


async def test_the_pipeline_takes_explicit_calls(served: App) -> None:
    """What a non-HTTP entry point (gRPC, a batch job) does: build a ``Call``, read the ``Answer``."""
    pipeline = served.app.state.pipeline  # type: ignore[attr-defined]

    def decode(model: LoadedModel) -> Decoded:
        return Decoded({"x": np.array([[5.0, 6.0]], dtype=np.float32)}, 1, None, extra="kept")

    answer = await pipeline.infer(Call("m", "batch", decode, cache="no-store"))
    assert answer.outputs["y"].tolist() == [[10.0, 12.0]]
    assert (answer.version, answer.cache, answer.extra, answer.replay_ttl_s) == ("2", "miss", "kept", None)
    with pytest.raises(ModelNotFound):
        await pipeline.infer(Call("m", "batch", decode, version="1"))
    with pytest.raises(PayloadTooLarge):
        await pipeline.infer(Call("m", "batch", lambda m: Decoded({"x": np.ones((9, 2), np.float32)}, 9)))

    def invalid(model: LoadedModel) -> Decoded:
        raise InvalidInput("bad", field="x")

    with pytest.raises(InvalidInput):
        await pipeline.infer(Call("m", "batch", invalid))
    assert served.sample("ferry_requests_rejected_total", model="m", reason="invalid_input") == 1


async def test_a_call_whose_client_is_gone_is_dropped_before_the_model(served: App) -> None:
    pipeline = served.app.state.pipeline  # type: ignore[attr-defined]
    runtime = served.registry.runtimes["m"]
    before = list(runtime.batches)

    def decode(model: LoadedModel) -> Decoded:
        return Decoded({"x": np.array([[7.0, 8.0]], dtype=np.float32)}, 1)

    with pytest.raises(ClientGone):
        await pipeline.infer(Call("m", "batch", decode, gone=lambda: True))
    assert runtime.batches == before
    assert served.sample("ferry_requests_rejected_total", model="m", reason="client_gone") == 1


async def asgi_call(
    app: Any, method: str, path: str, messages: list[dict[str, Any]], headers: Any = ()
) -> int:
    """Call the app as a server would, with ``messages`` as what ``receive`` returns (then it waits);
    returns the response status."""
    pending = messages
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # a client that never sends more
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000), "app": app,
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


async def test_a_client_that_hangs_up_mid_body_is_499_not_a_server_error(
    served: App, caplog: pytest.LogCaptureFixture
) -> None:
    partial = [
        {"type": "http.request", "body": b'{"inputs": [[1.0,', "more_body": True},
        {"type": "http.disconnect"},
    ]
    headers = [("content-type", "application/json"), ("content-length", "40")]
    for path in ("/predict", "/v2/models/m/infer", "/invocations"):
        assert await asgi_call(served.app, "POST", path, list(partial), headers) == 499, path
    assert served.sample("http_requests_total", status="499") == 3
    assert served.sample("http_requests_total", status="500") == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_made_up_method_is_counted_as_other(served: App) -> None:
    r = await served.client.request("BREW", "/predict")
    assert r.status_code == 405
    assert served.sample("http_requests_total", method="other", status="405") == 1
    assert served.sample("http_requests_total", method="BREW") == 0


async def test_the_admin_token_is_checked_before_any_of_the_body_is_read() -> None:
    settings = Settings(
        models=["m=models:/m@champion"], admin_token="secret-admin-token", reload={"poll_s": 0}
    )
    app = create_app(settings, Metrics(process=False), FakeRegistry())  # type: ignore[arg-type]
    reads: list[str] = []

    class Spy(list):  # type: ignore[type-arg]
        def pop(self, index: int = -1) -> Any:
            reads.append("read")
            return super().pop(index)

    async with app.router.lifespan_context(app):
        body = Spy([{"type": "http.request", "body": b'{"uri": "models:/x@champion"}', "more_body": False}])
        status = await asgi_call(app, "PUT", "/admin/models/x", body, [("content-length", "29")])
    assert status == 401
    assert reads == [], "the body was read before the token was checked"


@pytest.mark.parametrize(
    "shape", [[1] * 65, [0, 2**62], [2**40, 0]], ids=["65 axes", "0 x 2**62", "2**40 x 0"]
)
async def test_absurd_v2_shapes_are_400_naming_the_input(served: App, shape: list[int]) -> None:
    data = [0.0] * (1 if all(shape) else 0)  # as many values as the shape holds (1 or none)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]}
    r = await served.client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 400 and "'x'" in r.json()["error"], r.text
    header = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": %s, "parameters": {"binary_data_size": 0}}]}'
    )
    content = header % str(shape).encode()
    r = await served.client.post(
        "/v2/models/m/infer", content=content, headers={"inference-header-content-length": str(len(content))}
    )
    assert r.status_code == 400 and "'x'" in r.json()["error"], r.text
    assert served.sample("http_requests_total", status="500") == 0
