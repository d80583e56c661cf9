"""``GuardedHttpProtocol`` (service/cli.py) driven byte by byte on a fake transport, with short timeouts:
the header timeout from a connection's opening and from a request's first byte, the header size bound,
a pipelined head that waits while the request before it is answered, and an answer sent before the
body closes the connection while a whole body keeps it alive.

The same behaviour over real sockets against a real uvicorn Ferry: tests/integration/test_limits.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.cli import GuardedHttpProtocol, connection_limits, guarded_http
from service.config import LimitSettings
from service.metrics import Metrics

TIMEOUT_S = 0.05
Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def is_closed(transport: FakeTransport) -> bool:
    """Read through a call, so that mypy does not narrow the attribute between steps."""
    return transport.closed


async def answer(send: Callable[[Any], Awaitable[None]], body: bytes = b"ok") -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def reads_body(scope: Scope, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await answer(send)


async def answers_at_once(scope: Scope, receive: Any, send: Any) -> None:
    await answer(send, b"refused")


def connection(
    app: ASGI, metrics: Metrics | None = None, **limits: Any
) -> tuple[GuardedHttpProtocol, FakeTransport]:
    limits.setdefault("header_timeout_s", TIMEOUT_S)
    protocol_class = guarded_http(LimitSettings(**limits), metrics or Metrics(process=False))
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http=protocol_class)
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def settle(seconds: float = 0.0) -> None:
    await asyncio.sleep(seconds)
    for _ in range(5):
        await asyncio.sleep(0)


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("ferry_http_rejected_total", {"reason": reason}) or 0.0


@pytest.mark.asyncio
async def test_a_connection_that_sends_nothing_is_closed_silently() -> None:
    metrics = Metrics(process=False)
    _, transport = connection(reads_body, metrics)
    await settle(TIMEOUT_S * 3)
    assert is_closed(transport) and transport.written == b""
    assert rejected(metrics, "header_timeout") == 1


@pytest.mark.asyncio
async def test_partial_headers_get_408_then_close() -> None:
    protocol, transport = connection(reads_body)
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    await settle(TIMEOUT_S * 3)
    assert transport.written.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close" in transport.written and b'"code":"request_timeout"' in transport.written
    assert is_closed(transport)


@pytest.mark.asyncio
async def test_headers_in_time_are_served_and_the_timer_is_off_while_the_app_answers() -> None:
    gate = asyncio.Event()

    async def slow(scope: Scope, receive: Any, send: Any) -> None:
        await gate.wait()
        await answer(send)

    protocol, transport = connection(slow)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle(TIMEOUT_S * 3)  # the app takes longer than the header timeout: no matter
    assert not is_closed(transport)
    gate.set()
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK") and not is_closed(transport)


@pytest.mark.asyncio
async def test_a_pipelined_head_waits_while_the_request_before_it_is_answered() -> None:
    gate = asyncio.Event()

    async def slow(scope: Scope, receive: Any, send: Any) -> None:
        await gate.wait()
        await answer(send)

    protocol, transport = connection(slow)
    protocol.data_received(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHo")
    await settle(TIMEOUT_S * 3)
    assert not is_closed(transport) and transport.written == b""
    gate.set()
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    await settle(TIMEOUT_S * 3)  # now the second head's time runs, and runs out
    assert b"408 Request Timeout" in transport.written and is_closed(transport)


@pytest.mark.asyncio
async def test_a_head_dripped_byte_by_byte_on_a_kept_alive_connection_times_out() -> None:
    """uvicorn's keep-alive timer stops at the next request's first byte; the head's timer then runs
    however often bytes arrive."""
    protocol, transport = connection(reads_body)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK") and not is_closed(transport)
    for byte in b"GET / HTTP/1.1\r\nX-Drip: abcdefghijklmnopqrstuvwxyz":
        if is_closed(transport):
            break
        protocol.data_received(bytes([byte]))
        await settle(TIMEOUT_S / 4)
    assert is_closed(transport) and b"408 Request Timeout" in transport.written


@pytest.mark.asyncio
async def test_headers_over_the_bound_get_431() -> None:
    metrics = Metrics(process=False)
    protocol, transport = connection(reads_body, metrics, max_header_bytes=1024)
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 600)
    assert not is_closed(transport)
    protocol.data_received(b"a" * 600)
    assert transport.written.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert is_closed(transport)
    assert rejected(metrics, "header_size") == 1


@pytest.mark.asyncio
async def test_headers_over_the_bound_in_one_read_get_431_and_are_not_served() -> None:
    """Found by the soak: a head that arrives whole in one read was parsed (and its request served)
    before its size was checked."""
    protocol, transport = connection(reads_body, max_header_bytes=1024)
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"200 OK" not in transport.written and is_closed(transport)


@pytest.mark.asyncio
async def test_a_head_ending_across_two_reads_with_a_body_is_not_too_large() -> None:
    protocol, transport = connection(reads_body, max_header_bytes=1024)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r")
    protocol.data_received(b"\n" + b"a" * 3000)
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK"), transport.written[:80]


@pytest.mark.asyncio
async def test_a_large_body_does_not_count_as_headers() -> None:
    protocol, transport = connection(reads_body, max_header_bytes=1024)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 2000)
    protocol.data_received(b"a" * 3000)
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK") and not is_closed(transport)


@pytest.mark.asyncio
async def test_an_answer_before_the_whole_body_closes_the_connection() -> None:
    protocol, transport = connection(answers_at_once)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in transport.written and is_closed(transport)


@pytest.mark.asyncio
async def test_a_whole_body_keeps_the_connection_alive() -> None:
    protocol, transport = connection(reads_body)
    for _ in range(2):
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        await settle()
        protocol.data_received(b"body")
        await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2
    assert b"connection: close" not in transport.written and not is_closed(transport)


@pytest.mark.asyncio
async def test_a_client_asking_to_close_is_closed() -> None:
    protocol, transport = connection(reads_body)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await settle()
    assert b"connection: close" in transport.written and is_closed(transport)


@pytest.mark.asyncio
async def test_shutdown_while_the_body_arrives_still_closes_after_the_answer() -> None:
    protocol, transport = connection(reads_body)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    await settle()
    protocol.shutdown()  # uvicorn stopping: answer this one, then close
    protocol.data_received(b"body")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK") and is_closed(transport)


def test_connection_limits_are_the_settings() -> None:
    limits = LimitSettings(header_timeout_s=2.5, max_header_bytes=2048, keep_alive_s=75)
    options = connection_limits(limits, Metrics(process=False))
    assert options["timeout_keep_alive"] == 75
    protocol = options["http"]
    assert issubclass(protocol, GuardedHttpProtocol)
    assert (protocol.head_timeout_s, protocol.max_head_bytes) == (2.5, 2048)
    assert b"2.5 s" in protocol.head_timeout_answer and b"2048 bytes" in protocol.head_too_large_answer
