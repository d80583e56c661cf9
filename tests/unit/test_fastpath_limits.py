"""``FastPath``'s body timeout and concurrency cap, in process: ``create_app`` with a fake registry,
called as ASGI with a ``receive`` that stalls mid-body, so the tests decide when bytes arrive.

Over real sockets against a real uvicorn Ferry: tests/integration/test_limits.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import pytest_asyncio
from pydantic import SecretStr

from fakes import FakeRegistry
from service.api.app import create_app
from service.config import LimitSettings, ReloadSettings, Settings
from service.metrics import Metrics

pytestmark = pytest.mark.asyncio
BODY_TIMEOUT_S = 0.05
ADMIN = "admin-token-for-limits"
Message = dict[str, Any]


class Reply:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        else:
            self.body += message.get("body", b"")

    def json(self) -> Any:
        return orjson.loads(self.body)


def stalling(chunks: list[bytes], release: asyncio.Event | None = None) -> Callable[[], Awaitable[Message]]:
    """``receive`` that hands out ``chunks`` (more to come after each), then waits for ``release``
    (forever when none) before the last, empty one."""
    queue = list(chunks)

    async def receive() -> Message:
        if queue:
            return {"type": "http.request", "body": queue.pop(0), "more_body": True}
        await (release or asyncio.Event()).wait()
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


async def call(
    app: Any,
    method: str,
    path: str,
    receive: Callable[[], Awaitable[Message]],
    headers: list[tuple[str, str]] | None = None,
) -> Reply:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [(k.encode(), v.encode()) for k, v in headers or [("content-type", "application/json")]],
    }
    reply = Reply()
    await app(scope, receive, reply.send)
    return reply


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("ferry_http_rejected_total", {"reason": reason}) or 0.0


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[Any, Metrics]]:
    metrics = Metrics(process=False)
    settings = Settings(
        models=["m=models:/m@champion"],
        reload=ReloadSettings(poll_s=0),
        admin_token=SecretStr(ADMIN),
        limits=LimitSettings(body_timeout_s=BODY_TIMEOUT_S, max_concurrency=2, max_body_bytes=64),
    )
    app = create_app(settings, metrics, FakeRegistry())  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.pipeline.models.ready():
                break
            await asyncio.sleep(0.01)
        yield app, metrics


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/predict", {"error"}),
        ("/v2/models/m/infer", {"error"}),
        ("/invocations", {"error_code", "message"}),
        ("/admin/models/m", {"error"}),  # a FastAPI route: its body parsing would make this a 400
    ],
)
async def test_a_stalled_body_is_408_in_the_protocols_shape(
    served: tuple[Any, Metrics], path: str, shape: set[str]
) -> None:
    app, metrics = served
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {ADMIN}")]
    method = "PUT" if path.startswith("/admin") else "POST"
    async with asyncio.timeout(5):
        reply = await call(app, method, path, stalling([b'{"inputs": ']), headers)
    assert reply.status == 408, reply.body
    assert set(reply.json()) == shape
    assert "FERRY_LIMITS__BODY_TIMEOUT_S" in reply.body.decode()
    assert rejected(metrics, "body_timeout") == 1


async def test_a_body_over_the_limit_on_a_fastapi_route_is_413_not_400(served: tuple[Any, Metrics]) -> None:
    app, _ = served
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {ADMIN}")]
    chunked = stalling([b'{"uri": "' + b"x" * 40, b"x" * 40])  # no Content-Length: chunked
    reply = await call(app, "PUT", "/admin/models/m", chunked, headers)
    assert reply.status == 413 and reply.json()["error"]["code"] == "payload_too_large"


async def test_a_body_that_arrives_in_time_is_answered(served: tuple[Any, Metrics]) -> None:
    app, metrics = served
    release = asyncio.Event()
    asyncio.get_running_loop().call_later(BODY_TIMEOUT_S / 5, release.set)
    reply = await call(app, "POST", "/predict", stalling([b'{"inputs": [[1.0, 2.0]]}'], release))
    assert reply.status == 200 and "outputs" in reply.json()
    assert rejected(metrics, "body_timeout") == 0


async def test_a_body_already_in_memory_arms_no_timer(
    served: tuple[Any, Metrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's request cycle says when the whole body is in memory: the read cannot wait."""
    app, _ = served

    class Cycle:  # what uvicorn hands the app: its request cycle's bound ``receive``
        more_body = False
        disconnected = False

        async def receive(self) -> Message:
            return {"type": "http.request", "body": b'{"inputs": [[1.0, 2.0]]}', "more_body": False}

    def no_timer(when: float | None) -> Any:
        raise AssertionError("a timer was armed for a body already in memory")

    monkeypatch.setattr("service.api.middleware.asyncio.timeout_at", no_timer)
    reply = await call(app, "POST", "/predict", Cycle().receive)
    assert reply.status == 200


async def test_the_cap_answers_503_with_retry_after_and_spares_the_probes(
    served: tuple[Any, Metrics],
) -> None:
    app, metrics = served
    release = asyncio.Event()
    held = [
        asyncio.create_task(call(app, "POST", "/predict", stalling([b'{"inputs": [[1.0, 2.0]]}'], release)))
        for _ in range(2)
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    for path in ("/predict", "/v2/models/m/infer", "/invocations"):
        refused = await call(app, "POST", path, stalling([b"{}"], asyncio.Event()))
        assert refused.status == 503, (path, refused.body)
        assert refused.headers["retry-after"] == "1"
        assert "FERRY_LIMITS__MAX_CONCURRENCY" in refused.body.decode()
    assert (await call(app, "POST", "/predict", stalling([b"{}"]))).json()["error"]["code"] == "overloaded"
    for probe in ("/health/ready", "/health/live", "/metrics", "/ping", "/v2/health/ready"):
        async with asyncio.timeout(5):
            assert (await call(app, "GET", probe, stalling([]))).status == 200, probe
    assert rejected(metrics, "concurrency") == 4
    release.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    release_again = asyncio.Event()
    release_again.set()
    reply = await call(app, "POST", "/predict", stalling([b'{"inputs": [[1.0, 2.0]]}'], release_again))
    assert reply.status == 200  # the slots were given back
