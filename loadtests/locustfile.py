"""Locust users for Ferry: the request mix of real clients, with the gate of ``gate.py``.

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 32 -r 32 -t 45s --host http://127.0.0.1:8000 \\
        --gate-profile full
    make loadtest                   # Ferry and the floor started for you, CSV and HTML reports

Users (closed loop, no think time: each user is one client with one keep-alive connection):

- ``SingleRowUser``: one row to ``/predict``; 70% unique inputs, 30% drawn from 32 fixed rows, so that a
  Ferry with its cache on answers those from the cache;
- ``BatchUser``: 32 unique rows to ``/predict``;
- ``ProtocolUser``: one row through the Open Inference Protocol (``/v2/models/{model}/infer``) and
  through MLflow's scoring protocol (``/invocations``, which answers with the default model: serve the
  load-tested model first);
- ``InvalidUser``: wrong feature count, malformed JSON, unknown model, a bad v2 datatype: each must get a
  4xx (recorded as a success only then; request names start with ``invalid``).

Environment: ``FERRY_LOADTEST_MODEL`` (default ``tabular-mlp-onnx``), ``FERRY_LOADTEST_FEATURES`` (64),
``FERRY_LOADTEST_INPUT`` (the model's input name, ``input``).
"""

from __future__ import annotations

import itertools
import json
import os
import random

import gate  # noqa: F401  (registers the gate's command-line options and listeners)
from locust import FastHttpUser, constant, task

MODEL = os.environ.get("FERRY_LOADTEST_MODEL", "tabular-mlp-onnx")
FEATURES = int(os.environ.get("FERRY_LOADTEST_FEATURES", "64"))
INPUT = os.environ.get("FERRY_LOADTEST_INPUT", "input")
BATCH_ROWS = 32
REPEATED = 32
JSON = {"Content-Type": "application/json"}
_UNIQUE = "__N__"
_counter = itertools.count(1)
_rng = random.Random(7)  # noqa: S311 (test data, not secrets)


def _row() -> list[float]:
    return [round(_rng.gauss(0.0, 1.0), 4) for _ in range(FEATURES)]


class _Template:
    """A JSON body with one number replaced per request by a fresh integer: unique inputs for the cost of
    one concatenation (generating 64 random floats per request would cost Locust more than Ferry)."""

    def __init__(self, value: object) -> None:
        text = json.dumps(value).replace(f'"{_UNIQUE}"', _UNIQUE)
        self.prefix, _, self.suffix = text.partition(_UNIQUE)

    def body(self) -> str:
        return f"{self.prefix}{next(_counter)}{self.suffix}"


def _unique_rows(rows: int) -> list[list[object]]:
    value: list[list[object]] = [list(_row()) for _ in range(rows)]
    value[0][0] = _UNIQUE
    return value


PREDICT_ONE = _Template({"model": MODEL, "inputs": _unique_rows(1)})
PREDICT_BATCH = _Template({"model": MODEL, "inputs": _unique_rows(BATCH_ROWS)})
PREDICT_REPEATED = [json.dumps({"model": MODEL, "inputs": [_row()]}) for _ in range(REPEATED)]
V2_ONE = _Template(
    {"inputs": [{"name": INPUT, "shape": [1, FEATURES], "datatype": "FP32", "data": _unique_rows(1)[0]}]}
)
INVOCATIONS_ONE = _Template({"inputs": _unique_rows(1)})

INVALID = {
    "invalid: wrong feature count": (
        "/predict",
        json.dumps({"model": MODEL, "inputs": [[0.5] * (FEATURES - 1)]}),
    ),
    "invalid: malformed JSON": ("/predict", '{"model": "' + MODEL + '", "inputs": [[0.5, '),
    "invalid: unknown model": (
        "/predict",
        json.dumps({"model": "no-such-model", "inputs": [[0.5] * FEATURES]}),
    ),
    "invalid: v2 datatype": (
        f"/v2/models/{MODEL}/infer",
        json.dumps(
            {
                "inputs": [
                    {"name": INPUT, "shape": [1, FEATURES], "datatype": "FP99", "data": [0.5] * FEATURES}
                ]
            }
        ),
    ),
}


class _Ferry(FastHttpUser):
    abstract = True
    wait_time = constant(0)

    def post_ok(self, path: str, body: str, name: str) -> None:
        """A valid request: anything but 200 is a failure."""
        with self.client.post(path, data=body, headers=JSON, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")


class SingleRowUser(_Ferry):
    weight = 6

    @task(7)
    def unique_row(self) -> None:
        self.post_ok("/predict", PREDICT_ONE.body(), "predict 1 row")

    @task(3)
    def repeated_row(self) -> None:
        self.post_ok("/predict", random.choice(PREDICT_REPEATED), "predict 1 row (repeated)")  # noqa: S311


class BatchUser(_Ferry):
    weight = 1

    @task
    def batch(self) -> None:
        self.post_ok("/predict", PREDICT_BATCH.body(), f"predict {BATCH_ROWS} rows")


class ProtocolUser(_Ferry):
    weight = 2

    @task
    def v2_infer(self) -> None:
        self.post_ok(f"/v2/models/{MODEL}/infer", V2_ONE.body(), "v2 infer 1 row")

    @task
    def invocations(self) -> None:
        self.post_ok("/invocations", INVOCATIONS_ONE.body(), "invocations 1 row")


class InvalidUser(_Ferry):
    weight = 1
    measuring_floor = False

    def on_start(self) -> None:
        # The floor (gate profile "floor") parses and answers 200 whatever the input: it only measures.
        options = self.environment.parsed_options
        self.measuring_floor = options is not None and getattr(options, "gate_profile", "") == "floor"

    @task
    def invalid(self) -> None:
        name = random.choice(list(INVALID))  # noqa: S311
        path, body = INVALID[name]
        with self.client.post(path, data=body, headers=JSON, name=name, catch_response=True) as response:
            if 400 <= response.status_code < 500 or self.measuring_floor:
                response.success()
            else:
                response.failure(f"expected a 4xx, got {response.status_code}")
