"""The prediction cache through the real app: Ferry served by uvicorn, a real redis-server started here.

The memory tier is off in the Redis server's Ferry, so every hit below comes from Redis.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from conftest import RedisServer, Registry, Server, fault_summary, start_server, stop_server
from service.cache import cache_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not on PATH (make tools)"
    ),
]
PREFIX = "ferry:test:"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def redis_ferry(
    registry: Registry, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        registry,
        "linear=models:/linear@champion",
        tmp_path_factory.mktemp("redis-ferry"),
        {
            "FERRY_REDIS_URL": redis_server.url,
            "FERRY_CACHE__MEMORY_BYTES": "0",
            "FERRY_CACHE__RESPONSE_BYTES": "0",
            "FERRY_CACHE__KEY_PREFIX": PREFIX,
            "FERRY_CACHE__REDIS_TIMEOUT_MS": "200",
            "FERRY_CACHE__BREAKER_RESET_S": "0.5",
        },
    )
    yield server
    stop_server(server)


def predict(server: Server, row: list[float], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/predict", json={"model": "linear", "inputs": [row]}, headers=headers, timeout=30
    )


def redis_key(row: list[float]) -> bytes:
    # The key names the model's source, the registered model and version (pipeline.py).
    key = cache_key("linear", "models:/linear/1", {"input": np.array([row], dtype=np.float32)}, None)
    return (PREFIX + key.hex()).encode()


def test_memory_tier_hit_and_cache_control(ferry_server: Server) -> None:
    row = [0.25, 0.5, 0.75, 1.0]
    first, second = predict(ferry_server, row), predict(ferry_server, row)
    assert first.headers["X-Cache"] == "miss" and second.headers["X-Cache"] == "hit"
    assert first.json() == second.json() == {"model": "linear", "version": "1", "outputs": [[6.0] * 3]}
    assert predict(ferry_server, row, **{"Cache-Control": "no-cache"}).headers["X-Cache"] == "miss"
    fresh = [9.0, 9.0, 9.0, 9.5]
    assert predict(ferry_server, fresh, **{"Cache-Control": "no-store"}).headers["X-Cache"] == "miss"
    assert predict(ferry_server, fresh).headers["X-Cache"] == "miss"  # no-store stored nothing
    assert predict(ferry_server, fresh).headers["X-Cache"] == "hit"
    metrics = httpx.get(f"{ferry_server.url}/metrics").text
    assert (
        'ferry_cache_lookups_total{model="linear",result="hit",tier="response"}' in metrics
    )  # parse skipped


def test_redis_hit_stores_plain_bytes_not_pickle(redis_ferry: Server, redis_server: RedisServer) -> None:
    row = [1.0, 2.0, 3.0, 4.5]
    assert predict(redis_ferry, row).headers["X-Cache"] == "miss"
    client = redis_server.client()
    value = None
    for _ in range(100):  # the Redis write happens in the background, after the response
        value = client.get(redis_key(row))
        if value is not None:
            break
        time.sleep(0.02)
    assert value is not None and value.startswith(b"FRY1")
    assert b"\x80\x04" not in value[:2] and b"numpy" not in value
    hit = predict(redis_ferry, row)
    assert hit.headers["X-Cache"] == "hit" and hit.json()["outputs"] == [[22.0] * 3]


def test_garbage_in_redis_is_a_miss_and_is_overwritten(
    redis_ferry: Server, redis_server: RedisServer
) -> None:
    row = [7.0, 0.0, 0.0, 0.5]
    client = redis_server.client()
    client.set(redis_key(row), b"\x80\x04\x95garbage-that-looks-like-pickle")
    response = predict(redis_ferry, row)
    assert response.status_code == 200 and response.headers["X-Cache"] == "miss"
    assert response.json()["outputs"] == [[16.0] * 3]
    for _ in range(100):
        if (client.get(redis_key(row)) or b"").startswith(b"FRY1"):
            break
        time.sleep(0.02)
    assert client.get(redis_key(row)).startswith(b"FRY1")
    assert predict(redis_ferry, row).headers["X-Cache"] == "hit"


@pytest.mark.asyncio
async def test_redis_killed_under_load_then_restarted(redis_ferry: Server, redis_server: RedisServer) -> None:
    rng = np.random.default_rng(11)
    rows = rng.integers(-20, 20, size=(200, 4)).astype(float).tolist()
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=redis_ferry.url, timeout=60, limits=limits) as client:
        latencies: list[float] = []

        async def one(row: list[float]) -> httpx.Response:
            started = time.perf_counter()
            response = await client.post("/predict", json={"model": "linear", "inputs": [row]})
            latencies.append(time.perf_counter() - started)
            return response

        tasks = [asyncio.create_task(one(row)) for row in rows]
        await asyncio.sleep(0.05)
        redis_server.kill()  # while the 200 requests are in flight
        responses = await asyncio.gather(*tasks)
        fault_summary(
            "redis-server SIGKILLed under 200 concurrent requests",
            [r.status_code for r in responses],
            latencies,
        )
        assert [r.status_code for r in responses] == [200] * 200
        for row, response in zip(rows, responses, strict=True):
            assert response.json()["outputs"] == [[2 * sum(row) + 1] * 3]

        redis_server.start()  # same port: Ferry reconnects by itself
        row = [3.0, 3.0, 3.0, 3.0]
        hit = False
        for _ in range(100):
            r = await one(row)
            assert r.status_code == 200 and r.json()["outputs"] == [[25.0] * 3]
            if r.headers["X-Cache"] == "hit":
                hit = True
                break
            await asyncio.sleep(0.1)
        assert hit, "Redis hits did not resume after the restart"
        metrics = (await client.get("/metrics")).text
    assert 'ferry_cache_lookups_total{model="linear",result="hit",tier="redis"}' in metrics
