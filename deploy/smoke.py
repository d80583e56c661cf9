#!/usr/bin/env python3
"""Smoke test of a running Ferry: it is live, it becomes ready, it predicts, it exports metrics.

Standard library only, so it runs on any CI runner without installing Ferry:

    python3 deploy/smoke.py http://127.0.0.1:8000 [--timeout 300] [--model tabular-mlp-onnx]
        [--features 64 | --input JSON]

Used by .github/workflows/docker.yml (each image, before it is pushed) and deploy.yml / rollback.yml
(each environment, after a rollout, through deploy/smoke-env.sh). The prediction is one request to
``--model`` with ``--input`` as its ``inputs`` (a JSON list of rows, or ``{"name": rows}``), by default
one row of ``--features`` zeros: the demo model ``tabular-mlp-onnx``. With SMOKE_API_KEY set, requests
carry ``Authorization: Bearer``. Exit status 0 when every check passed, 1 otherwise (2 for a malformed
``--input``); one line per check on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

LIVE = "/health/live"
READY = "/health/ready"
PREDICT = "/predict"
METRICS = "/metrics"
PATHS = (LIVE, READY, PREDICT, METRICS)
"""Every route this script calls (tests/ops/test_drift.py checks them against Ferry's route table)."""


class SmokeError(Exception):
    """A check failed."""


def request(
    base: str, path: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call; returns status, headers (lower-case names) and body, also for 4xx/5xx answers."""
    data = None if body is None else json.dumps(body).encode()
    url = base.rstrip("/") + path
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")  # noqa: S310
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key := os.environ.get("SMOKE_API_KEY"):
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the URL is the operator's)
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        try:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()
        finally:
            err.close()


def wait_for(base: str, path: str, deadline: float, interval: float = 2.0) -> bytes:
    """Poll ``path`` until it answers 200 or the deadline passes."""
    last = "no answer"
    while True:
        try:
            status, _, body = request(base, path, timeout=5.0)
            if status == 200:
                return body
            last = f"HTTP {status}: {body[:300].decode(errors='replace')}"
        except (OSError, urllib.error.URLError) as err:
            last = str(err)
        if time.monotonic() >= deadline:
            raise SmokeError(f"GET {path} never answered 200 (last: {last})")
        time.sleep(interval)


def input_rows(inputs: Any) -> int:
    """How many rows ``inputs`` holds: a list of rows, or ``{"name": rows}`` with equally long lists."""
    if isinstance(inputs, list) and inputs:
        return len(inputs)
    if isinstance(inputs, dict) and inputs and all(isinstance(v, list) and v for v in inputs.values()):
        counts = {len(v) for v in inputs.values()}
        if len(counts) == 1:
            return counts.pop()
    raise ValueError('expected a non-empty JSON list of rows or {"input name": rows} of equal lengths')


def predict(base: str, model: str, inputs: Any) -> str:
    """One prediction; returns the model version that computed it."""
    status, headers, body = request(base, PREDICT, {"model": model, "inputs": inputs}, timeout=30.0)
    if status == 401:
        raise SmokeError(
            f"POST {PREDICT} answered HTTP 401: Ferry wants an API key; set the secret SMOKE_API_KEY "
            "to one of its FERRY_API_KEYS"
        )
    if status != 200:
        raise SmokeError(f"POST {PREDICT} answered HTTP {status}: {body[:500].decode(errors='replace')}")
    payload = json.loads(body)
    outputs = payload.get("outputs")
    if payload.get("model") != model or outputs is None:
        raise SmokeError(f"POST {PREDICT}: unexpected body {payload!r:.500}")
    rows = outputs if isinstance(outputs, list) else next(iter(outputs.values()), None)
    expected = input_rows(inputs)
    if not isinstance(rows, list) or len(rows) != expected:
        raise SmokeError(f"POST {PREDICT}: expected {expected} output row(s), got {outputs!r:.500}")
    return headers.get("x-model-version") or str(payload.get("version"))


def run(base: str, timeout: float, model: str, inputs: Any) -> None:
    deadline = time.monotonic() + timeout
    wait_for(base, LIVE, deadline)
    print(f"ok   {LIVE}")
    wait_for(base, READY, deadline)
    print(f"ok   {READY}")
    version = predict(base, model, inputs)
    print(f"ok   {PREDICT} {model} version {version}")
    status, _, body = request(base, METRICS)
    if status != 200 or b"ferry_" not in body:
        raise SmokeError(f"GET {METRICS} answered HTTP {status} without ferry_* metrics")
    print(f"ok   {METRICS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="Ferry's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--model", default="tabular-mlp-onnx", help="model to predict with")
    parser.add_argument("--features", type=int, default=64, help="float features of one input row")
    parser.add_argument(
        "--input",
        default="",
        help='the request\'s "inputs" as JSON (rows, or {"name": rows}); empty: one row of --features zeros',
    )
    args = parser.parse_args(argv)
    if args.input.strip():
        try:
            inputs = json.loads(args.input)
            input_rows(inputs)
        except ValueError as err:
            print(f"FAIL --input is not usable: {err}")
            return 2
    else:
        inputs = [[0.0] * args.features]
    try:
        run(args.base_url, args.timeout, args.model, inputs)
    except SmokeError as err:
        print(f"FAIL {err}")
        return 1
    print(f"smoke test passed: {args.base_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
