"""Authenticated Redis values through the real app: Ferry served by uvicorn with
``FERRY_CACHE__REDIS_SECRET_FILE``, a real ``redis-server`` started here on a free port, and values
planted in it behind Ferry's back.

The memory and response tiers are off, so every lookup reaches Redis. A planted value (what anyone who
can write to Redis could store) and a genuine value moved to another request's key are misses: the
model answers, the refusal is counted and logged, and the genuine answer overwrites the planted one.
A classifier's string labels are cached too (they used to be computed every time).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import RedisServer, Registry, Server, metric, start_server, stop_server, wait_until
from service.cache import encode_outputs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not on PATH (make tools)"
    ),
]
PREFIX = "ferry:auth:"
SECRET = b"a-secret-for-the-tests-0123456789\n"  # as a mounted Secret holds it, newline included
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"))
    server.start()
    yield server
    server.kill()


def register_labeler(registry: Registry) -> None:
    """``labeler@champion``: label_model.py, float rows in, one string label per row out."""
    import mlflow
    from mlflow.models import infer_signature

    from conftest import _register

    example = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]], dtype=np.float32)
    mlflow.set_tracking_uri(registry.tracking_uri)
    tests = mlflow.get_experiment_by_name("tests")  # the registry's own: artifacts under its root
    with mlflow.start_run(experiment_id=tests.experiment_id if tests is not None else None):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(HERE / "label_model.py"),
            signature=infer_signature(example, np.array(["pos", "neg"])),
            input_example=example,
        )
    _register("labeler", info, alias="champion")


@pytest.fixture(scope="module")
def sealed_ferry(
    registry: Registry, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    register_labeler(registry)
    workdir = tmp_path_factory.mktemp("sealed-ferry")
    secret_file = workdir / "redis-secret"
    secret_file.write_bytes(SECRET)
    server = start_server(
        registry,
        "linear=models:/linear@champion,labeler=models:/labeler@champion",
        workdir,
        {
            "FERRY_REDIS_URL": redis_server.url,
            "FERRY_CACHE__REDIS_SECRET_FILE": str(secret_file),
            "FERRY_CACHE__MEMORY_BYTES": "0",
            "FERRY_CACHE__RESPONSE_BYTES": "0",
            "FERRY_CACHE__KEY_PREFIX": PREFIX,
            "FERRY_CACHE__REDIS_TIMEOUT_MS": "500",
        },
    )
    yield server
    stop_server(server)


def predict(server: Server, model: str, row: list[float]) -> httpx.Response:
    r = httpx.post(f"{server.url}/predict", json={"model": model, "inputs": [row]}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def stored_key(redis_server: RedisServer, known: set[bytes]) -> bytes:
    """The one Redis key that is not in ``known``, once the background write has landed."""
    raw = redis_server.client()
    fresh: list[bytes] = []

    def landed() -> bool:
        fresh[:] = [k for k in raw.keys(PREFIX + "*") if k not in known]
        return len(fresh) == 1

    assert wait_until(landed, 10, 0.02), fresh
    return fresh[0]


def refused(server: Server) -> float:
    return float(metric(httpx.get(f"{server.url}/metrics").text, "ferry_cache_unauthenticated_total"))


def test_values_carry_a_mac_and_verified_ones_are_hits(
    sealed_ferry: Server, redis_server: RedisServer
) -> None:
    known = set(redis_server.client().keys(PREFIX + "*"))
    first = predict(sealed_ferry, "linear", [0.5, 0.5, 0.5, 0.5])
    key = stored_key(redis_server, known)
    stored = redis_server.client().get(key)
    assert stored.startswith(b"FRM1") and b"FRY1" in stored and SECRET.strip() not in stored
    second = predict(sealed_ferry, "linear", [0.5, 0.5, 0.5, 0.5])
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json() == second.json() == {"model": "linear", "version": "1", "outputs": [[5.0] * 3]}


def test_a_planted_value_is_not_served(sealed_ferry: Server, redis_server: RedisServer) -> None:
    raw = redis_server.client()
    row, other = [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]
    known = set(raw.keys(PREFIX + "*"))
    assert predict(sealed_ferry, "linear", row).json()["outputs"] == [[9.0] * 3]
    key = stored_key(redis_server, known)
    assert predict(sealed_ferry, "linear", row).headers["x-cache"] == "hit"
    before = refused(sealed_ferry)

    forged = encode_outputs({"output": np.full((1, 3), 666.0, dtype=np.float32)})
    raw.set(key, forged)  # a well-formed value with the attacker's answer, no MAC
    r = predict(sealed_ferry, "linear", row)
    assert r.headers["x-cache"] == "miss" and r.json()["outputs"] == [[9.0] * 3]

    known = set(raw.keys(PREFIX + "*"))
    predict(sealed_ferry, "linear", other)
    genuine = raw.get(stored_key(redis_server, known))
    raw.set(key, genuine)  # a genuine value of another request, moved: its MAC names its own key
    r = predict(sealed_ferry, "linear", row)
    assert r.headers["x-cache"] == "miss" and r.json()["outputs"] == [[9.0] * 3]

    assert refused(sealed_ferry) == before + 2
    assert wait_until(lambda: raw.get(key) not in (forged, genuine), 10, 0.02)  # overwritten
    assert predict(sealed_ferry, "linear", row).headers["x-cache"] == "hit"
    log = sealed_ferry.log()
    assert "refused 1 value(s)" in log  # the first refusal at once; the second waits for the minute
    assert SECRET.strip().decode() not in log


def test_string_labels_are_cached(sealed_ferry: Server, redis_server: RedisServer) -> None:
    known = set(redis_server.client().keys(PREFIX + "*"))
    first = predict(sealed_ferry, "labeler", [-1.0, 0.0, 0.0, 0.5])
    stored_key(redis_server, known)
    second = predict(sealed_ferry, "labeler", [-1.0, 0.0, 0.0, 0.5])
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.content == second.content
    assert first.json()["outputs"] == ["neg"]


def test_start_up_warns_only_without_a_secret(sealed_ferry: Server) -> None:
    assert "not authenticated" not in sealed_ferry.log()
