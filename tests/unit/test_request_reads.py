"""``deps.read_body`` and ``deps.header`` read what starlette's ``Request.body()`` and
``Request.headers.get`` read, without their per-request machinery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import Request
from starlette.requests import ClientDisconnect

from service.api.deps import cache_control, header, read_body


def request(messages: list[dict[str, Any]], headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers or []}
    return Request(scope, receive)


BODIES = [
    [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}],
    [{"type": "http.request", "body": b'{"a"', "more_body": True}, {"type": "http.request", "body": b": 1}"}],
    [{"type": "http.request", "body": b"", "more_body": True}, {"type": "http.request", "body": b"x"}],
    [{"type": "http.request"}],
]


@pytest.mark.parametrize("messages", BODIES)
def test_read_body_reads_what_starlette_reads(messages: list[dict[str, Any]]) -> None:
    async def both() -> tuple[bytes, bytes, bytes]:
        ours = request(messages)
        first = await read_body(ours)
        again = await ours.body()  # kept on the request, as starlette keeps it
        theirs = await request(messages).body()
        return first, again, theirs

    first, again, theirs = asyncio.run(both())
    assert first == again == theirs


def test_read_body_raises_client_disconnect_as_starlette_does() -> None:
    messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]

    async def read() -> Request:
        r = request(messages)
        with pytest.raises(ClientDisconnect):
            await read_body(r)
        return r

    assert asyncio.run(read())._is_disconnected


def test_header_is_the_first_value_as_starlette_reads_it() -> None:
    r = request(
        [], [(b"x-key", b"caf\xe9"), (b"x-key", b"second"), (b"cache-control", b"No-Store, max-age=0")]
    )
    assert header(r, b"x-key") == r.headers.get("x-key") == "café"
    assert header(r, b"absent") is None
    assert cache_control(r) == "no-store"
