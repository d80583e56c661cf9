"""A soak of one real Ferry: mixed traffic on many connections for minutes while the served model's alias
moves, with the server's memory sampled every second (issue 14).

    make soak                                                   # 10 minutes at 64 connections
    .venv/bin/python loadtests/soak.py --duration 600 --connections 64 --out loadtests/reports/soak
    .venv/bin/python loadtests/soak.py --duration 20 --out /tmp/soak       # a quick look

What it does, all of it on 127.0.0.1 and in a temporary folder:

- builds a fresh sqlite MLflow registry holding ``soak``: three versions of a torch ``Linear(4, 3)``
  logged as pt2 programs, version v computing ``w_v * sum(x) + 1`` on every output (w = 2, 3, 4), the
  alias ``champion`` on version 1. Inputs are small integers, so every answer is exact in float32 and
  checkable against the formula of the version its ``X-Model-Version`` names;
- starts ``python -m service serve`` following ``models:/soak@champion`` every second, with short read
  timeouts and small limits (``SOAK_ENV`` below) so that every kind of misbehaving client meets them;
- drives ``--connections`` clients at once, each of one kind, for ``--duration`` seconds:

  - **valid**: ``/predict``, v2 ``/v2/models/soak/infer`` and MLflow ``/invocations``, 1-8 rows, a quarter
    of them repeats of 16 fixed bodies (cache and response-replay hits); each answer must be 200 and
    equal the formula of its version;
  - **invalid**: wrong shape, strings, not JSON, NaN, an unknown model, an empty batch, a float32
    overflow, a bad v2 shape or 65 dimensions, an MLflow body without a known key; each must be 4xx;
  - **oversized**: a body above ``FERRY_LIMITS__MAX_BODY_BYTES`` with ``Content-Length`` or chunked
    (413), more rows than ``FERRY_LIMITS__MAX_ROWS`` (413), headers above
    ``FERRY_LIMITS__MAX_HEADER_BYTES`` (431);
  - **slow**: headers trickled a line every half second (408 and closed after
    ``FERRY_LIMITS__HEADER_TIMEOUT_S``), a body trickled a byte every half second (408 and closed after
    ``FERRY_LIMITS__BODY_TIMEOUT_S``), a connection that sends nothing (closed);
  - **hung up**: a whole request then closing before the answer, closing mid-body, closing mid-headers;

- moves the alias to version 2 at a third of the run and to version 3 at two thirds
  (``MlflowClient.set_registered_model_alias``);
- samples the server's ``VmRSS``, open file descriptors and threads (``/proc/PID``) every second, and
  asks ``/models/soak`` which version it serves;
- at the end reads ``/metrics`` (every status the server answered, what it refused and why) and counts
  ERROR lines in its log.

Writes ``--out``/``soak.json`` (every figure and the samples) and ``--out``/``ferry.log``, prints a
summary, and exits 1 when a criterion fails: RSS after warm-up (``--warmup``, default 10% of the run,
at most 60 s) grows by ``--max-rss-growth`` (10%) or more by the end, any 5xx (seen by a client or
counted by the server), any valid request not answered 200 or answered wrongly, any client not answered
as expected (an invalid request not 4xx, an oversized one not 413/431, a slow one not 408 or closed), the
alias not followed twice, or ERROR lines in the server's log. A stall of the soak's own process (a
thread checks every second) makes its clients fall silent: a 408 or a close without an answer to an
exchange that such a stall overlapped is reported apart (``excused``), never a wrong answer. Everything it
started is stopped on the way out, Ctrl-C and SIGTERM included (exit 130).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import math
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procs  # noqa: E402

ROOT = procs.ROOT
MODEL = "soak"
FEATURES, OUTPUTS = 4, 3
WEIGHTS = {"1": 2.0, "2": 3.0, "3": 4.0}
"""Version -> the weight of every entry of its layer; every bias is 1."""
MAX_BODY_BYTES = 64 * 1024
MAX_ROWS = 512
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT_S = 2.0
SOAK_ENV = {
    "FERRY_RELOAD__POLL_S": "1",
    "FERRY_LIMITS__MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "FERRY_LIMITS__MAX_ROWS": str(MAX_ROWS),
    "FERRY_LIMITS__MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "FERRY_LIMITS__HEADER_TIMEOUT_S": str(READ_TIMEOUT_S),
    "FERRY_LIMITS__BODY_TIMEOUT_S": str(READ_TIMEOUT_S),
    "FERRY_SHUTDOWN__GRACE_S": "0",
    "FERRY_LOG_LEVEL": "warning",
}
"""Ferry's settings in the soak besides the model and the registry (the cache bounds come from the
command line). The limits are small so that a misbehaving client meets them in a few kilobytes and
seconds."""
SHARES = {"valid": 0.60, "invalid": 0.10, "oversized": 0.06, "slow": 0.12, "hangup": 0.12}
"""Share of the connections given to each kind of client (each kind gets at least one)."""
TRICKLE_S = 0.5
STALL_S = 1.0
"""A stall of the soak's own process this long or longer excuses the exchanges it overlapped that went
wrong in a way a silent client explains (a 408, a close without an answer): they are reported apart,
not counted as failures. A wrong answer is never excused."""
EXAMPLES = 5
"""Failed, wrong or unexpected exchanges kept, request and answer, per kind."""


# --------------------------------------------------------------------------------------------- the registry
def build_registry(root: Path) -> str:
    """A sqlite registry under ``root`` with the three versions of ``soak`` (``champion`` on 1); its URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("soak", artifact_location=(root / "artifacts").as_uri())
    example = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    for version, weight in WEIGHTS.items():
        layer = torch.nn.Linear(FEATURES, OUTPUTS)
        with torch.no_grad():
            layer.weight.fill_(weight)
            layer.bias.fill_(1.0)
        layer.eval()
        with torch.inference_mode():
            output = layer(torch.from_numpy(example)).numpy()
        assert np.array_equal(output, expected(version, example.tolist()))
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pytorch.log_model(
                layer,
                name="model",
                serialization_format="pt2",
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=["torch"],
            )
        registered = mlflow.register_model(info.model_uri, MODEL)
        assert str(registered.version) == version, registered.version
    MlflowClient(uri).set_registered_model_alias(MODEL, "champion", "1")
    return uri


def expected(version: str, rows: list[list[float]]) -> np.ndarray:
    """What version ``version`` answers for ``rows``: ``w * sum(row) + 1`` on each of its outputs."""
    sums = np.asarray(rows, dtype=np.float64).sum(axis=1, keepdims=True)
    return np.repeat(WEIGHTS[version] * sums + 1.0, OUTPUTS, axis=1)


# ------------------------------------------------------------------------------------------------ the tally
Example = dict[str, Any] | Callable[[], dict[str, Any]] | None
"""What is kept of an exchange that went wrong: the details, or a function building them."""


@dataclass
class Tally:
    """Everything the clients saw, in seconds since the traffic started."""

    started: float = field(default_factory=time.monotonic)
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """kind/subkind -> outcome (a status code, ``closed``, ``reset``, ``sent``...) -> count."""
    problems: list[dict[str, Any]] = field(default_factory=list)
    """Every exchange whose outcome was not the one expected: kind, subkind, outcome, its span
    (``since_s``, ``at_s``) and what was sent and answered."""
    wrong: int = 0
    client_5xx: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    closed_after_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Version -> answers, first and last answer's time."""

    def now(self) -> float:
        return time.monotonic() - self.started

    def count(
        self, kind: str, sub: str, outcome: str, ok: bool, since: float, example: Example = None
    ) -> None:
        """One exchange, begun at ``since`` (``now()``); when its outcome was not ``ok``, it is kept with
        ``example`` (or what it returns)."""
        self.outcomes[f"{kind}/{sub}"][outcome] += 1
        if outcome[:1] == "5":
            self.client_5xx += 1
        if not ok:
            detail = example() if callable(example) else example or {}
            span = {"since_s": round(since, 2), "at_s": round(self.now(), 2)}
            self.problems.append({"kind": kind, "subkind": sub, "outcome": outcome, **span, **detail})

    def answered_by(self, version: str) -> None:
        now = self.now()
        seen = self.versions.setdefault(version, {"answers": 0, "first_s": now, "last_s": now})
        seen["answers"] += 1
        seen["last_s"] = now


def _short(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- the clients
def _rows(rng: random.Random, count: int) -> list[list[float]]:
    return [[float(rng.randint(-100, 100)) for _ in range(FEATURES)] for _ in range(count)]


FIXED = [_rows(random.Random(seed), 1 + seed % 4) for seed in range(16)]  # noqa: S311 (test data)
"""Bodies sent again and again: answered from the cache and the response-replay tier between swaps."""


def valid_request(rng: random.Random) -> tuple[str, str, dict[str, Any], list[list[float]]]:
    """(protocol, path, JSON body, rows) of a valid request."""
    rows = rng.choice(FIXED) if rng.random() < 0.25 else _rows(rng, rng.randint(1, 8))
    protocol = rng.choices(["ferry", "v2", "mlflow"], weights=[3, 1, 1])[0]
    if protocol == "ferry":
        return protocol, "/predict", {"model": MODEL, "inputs": rows}, rows
    if protocol == "v2":
        flat = [value for row in rows for value in row]
        body = {
            "inputs": [{"name": "input", "shape": [len(rows), FEATURES], "datatype": "FP32", "data": flat}]
        }
        return protocol, f"/v2/models/{MODEL}/infer", body, rows
    return protocol, f"/models/{MODEL}/invocations", {"inputs": rows}, rows


def check_answer(protocol: str, response: httpx.Response, rows: list[list[float]]) -> tuple[str, str]:
    """(version, problem): the problem is empty when the answer is what the version computes."""
    version = response.headers.get("x-model-version", "")
    if version not in WEIGHTS:
        return version, f"X-Model-Version {version!r} names none of the registered versions"
    try:
        body = response.json()
        if protocol == "ferry":
            outputs, said = body["outputs"], str(body["version"])
        elif protocol == "v2":
            output = body["outputs"][0]
            outputs, said = np.reshape(output["data"], output["shape"]).tolist(), str(body["model_version"])
        else:
            outputs, said = body["predictions"], version
    except (ValueError, KeyError, IndexError, TypeError) as error:
        return version, f"unreadable answer: {error!r}"
    if said != version:
        return version, f"the body says version {said}, X-Model-Version {version}"
    got = np.asarray(outputs, dtype=np.float64)
    if got.shape != (len(rows), OUTPUTS) or not np.array_equal(got, expected(version, rows)):
        return version, f"outputs differ from version {version}'s {expected(version, rows).tolist()}"
    return version, ""


async def valid_client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    async with _client(url) as client:
        while not stop.is_set():
            protocol, path, body, rows = valid_request(rng)
            since, started = tally.now(), time.perf_counter()
            try:
                response = await client.post(path, json=body)
            except httpx.HTTPError as error:
                detail = {"path": path, "body": _short(json.dumps(body)), "error": repr(error)}
                tally.count("valid", protocol, type(error).__name__, False, since, detail)
                continue
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
            problem = "" if response.status_code == 200 else f"status {response.status_code}"
            version = ""
            if not problem:
                version, problem = check_answer(protocol, response, rows)
            wrong = bool(problem) and response.status_code == 200
            if wrong:
                tally.wrong += 1
            elif not problem:
                tally.answered_by(version)

            def example(
                path: str = path,
                body: Any = body,
                response: httpx.Response = response,
                problem: str = problem,
                wrong: bool = wrong,
            ) -> dict[str, Any]:
                return {
                    "path": path,
                    "body": _short(json.dumps(body)),
                    **_answer(response),
                    "problem": problem,
                    "wrong": wrong,
                }

            tally.count("valid", protocol, str(response.status_code), not problem, since, example)


INVALID: list[tuple[str, str, bytes]] = [
    ("shape", "/predict", json.dumps({"model": MODEL, "inputs": [[1.0, 2.0, 3.0]]}).encode()),
    ("strings", "/predict", json.dumps({"model": MODEL, "inputs": [["a", "b", "c", "d"]]}).encode()),
    ("not-json", "/predict", b'{"model": "soak", "inputs": [[1, 2'),
    ("nan", "/predict", b'{"model": "soak", "inputs": [[NaN, 1, 2, 3]]}'),
    ("unknown-model", "/predict", json.dumps({"model": "nope", "inputs": [[1.0] * FEATURES]}).encode()),
    ("empty", "/predict", json.dumps({"model": MODEL, "inputs": []}).encode()),
    ("overflow", "/predict", json.dumps({"model": MODEL, "inputs": [[1e39, 0.0, 0.0, 0.0]]}).encode()),
    (
        "v2-shape",
        f"/v2/models/{MODEL}/infer",
        json.dumps(
            {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1.0]}]}
        ).encode(),
    ),
    (
        "v2-65-dims",
        f"/v2/models/{MODEL}/infer",
        json.dumps(
            {"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [1.0]}]}
        ).encode(),
    ),
    ("mlflow-no-key", f"/models/{MODEL}/invocations", json.dumps({"rows": [[1.0] * FEATURES]}).encode()),
]
"""(subkind, path, body) of requests every protocol must refuse with a 4xx."""


async def invalid_client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    async with _client(url) as client:
        while not stop.is_set():
            sub, path, body = rng.choice(INVALID)
            since = tally.now()
            try:
                response = await client.post(path, content=body, headers={"content-type": "application/json"})
            except httpx.HTTPError as error:
                detail = {"path": path, "body": _short(body), "error": repr(error)}
                tally.count("invalid", sub, type(error).__name__, False, since, detail)
                continue
            status = response.status_code

            def example(
                path: str = path, body: bytes = body, response: httpx.Response = response
            ) -> dict[str, Any]:
                return {"path": path, "body": _short(body), **_answer(response)}

            tally.count("invalid", sub, str(status), 400 <= status < 500, since, example)


async def oversized_client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    port = int(url.rsplit(":", 1)[1])
    async with _client(url) as client:
        while not stop.is_set():
            sub = rng.choice(["length", "chunked", "rows", "headers"])
            since = tally.now()
            if sub == "rows":
                body = json.dumps({"model": MODEL, "inputs": _rows(rng, MAX_ROWS + rng.randint(1, 100))})
                try:
                    response = await client.post("/predict", content=body, headers=_JSON)
                    outcome = str(response.status_code)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                tally.count("oversized", sub, outcome, outcome == "413", since, {"body": f"{MAX_ROWS}+ rows"})
                continue
            size = MAX_BODY_BYTES + rng.randint(1, 3 * MAX_BODY_BYTES)
            if sub == "length":
                head = _head("/predict", {"content-length": str(size), **_CLOSE})
                chunks = [head + b"[" + b" " * (size - 1)]
                want = "413"
            elif sub == "chunked":
                head = _head("/predict", {"transfer-encoding": "chunked", **_CLOSE})
                piece = b"2000\r\n" + b" " * 0x2000 + b"\r\n"
                chunks = [head, *([piece] * (size // 0x2000 + 1)), b"0\r\n\r\n"]
                want = "413"
            else:
                # From just over the limit to 4 times it, sent at once.
                size = rng.randint(MAX_HEADER_BYTES + 1024, 4 * MAX_HEADER_BYTES)
                filler = {f"x-filler-{i}": "f" * 1000 for i in range(size // 1000)}
                chunks = [_head("/predict", {"content-length": "2", **_CLOSE, **filler}) + b"[]"]
                want = "431"
            outcome, elapsed = await raw_exchange(port, chunks, 0.0, timeout_s=30.0)
            tally.count("oversized", sub, outcome, outcome == want, since, {"bytes": size})
            tally.closed_after_s[f"oversized/{sub}"].append(elapsed)


async def slow_client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    port = int(url.rsplit(":", 1)[1])
    deadline_s = READ_TIMEOUT_S + 10.0
    while not stop.is_set():
        sub = rng.choice(["headers", "body", "silent"])
        since = tally.now()
        if sub == "headers":
            first = b"POST /predict HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
            chunks = [first, *(f"x-slow-{i}: yes\r\n".encode() for i in range(1000))]
            wanted = {"408"}
        elif sub == "body":
            body = json.dumps({"model": MODEL, "inputs": _rows(rng, 2)}).encode()
            chunks = [_head("/predict", {"content-length": str(len(body))}), *(bytes([b]) for b in body)]
            wanted = {"408"}
        else:
            chunks = []
            wanted = {"closed"}
        outcome, elapsed = await raw_exchange(port, chunks, TRICKLE_S, timeout_s=deadline_s)
        tally.count("slow", sub, outcome, outcome in wanted, since, {"closed_after_s": round(elapsed, 2)})
        tally.closed_after_s[f"slow/{sub}"].append(elapsed)


async def hangup_client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    port = int(url.rsplit(":", 1)[1])
    while not stop.is_set():
        sub = rng.choice(["after-request", "mid-body", "mid-headers"])
        since = tally.now()
        body = json.dumps({"model": MODEL, "inputs": _rows(rng, rng.randint(1, 8))}).encode()
        request = _head("/predict", {"content-length": str(len(body))}) + body
        if sub == "mid-body":
            request = request[: len(request) - len(body) // 2]
        elif sub == "mid-headers":
            request = request[: request.index(b"\r\n") + 12]
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
            except OSError as error:
                tally.count("hangup", sub, type(error).__name__, False, since)
                await asyncio.sleep(0.1)
                continue
            outcome = "sent"
            try:
                await loop.sock_sendall(sock, request)
            except OSError as error:
                outcome = type(error).__name__
        # closed on leaving the block: sent, and nothing read
        tally.count("hangup", sub, outcome, outcome == "sent", since)
        await asyncio.sleep(0.05)  # the next connection: hanging up costs the client nothing


_JSON = {"content-type": "application/json"}
_CLOSE = {"connection": "close"}
"""Oversized requests ask for the connection to be closed after the answer, as a client that sends one
request would."""


def _client(url: str) -> httpx.AsyncClient:
    """One keep-alive connection, given up after 2 s idle: before Ferry's keep-alive timeout (5 s)
    closes it, so a request never races the server's close."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0)


def _answer(response: httpx.Response) -> dict[str, Any]:
    headers = {k: v for k, v in response.headers.items() if k in ("x-model-version", "x-cache", "connection")}
    return {"status": response.status_code, "headers": headers, "answer": _short(response.content)}


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: soak", "content-type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_exchange(port: int, chunks: list[bytes], pause_s: float, timeout_s: float) -> tuple[str, float]:
    """Open a connection, send ``chunks`` with ``pause_s`` between them, until the server closes the
    connection or ``timeout_s`` passes: (outcome, seconds). The outcome is the answer's status code,
    ``closed`` (closed without an answer), ``reset`` (reset without an answer) or ``open`` (neither
    answered nor closed in time); ``+open`` is added to a status when the connection stayed open after it.

    The client stops sending once an answer arrived or a send failed, and reads on after a failed send:
    a server that answers before reading the whole body and closes resets the connection, and the answer
    is still in this side's receive queue (an asyncio transport would drop it with the connection)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    received = bytearray()
    with socket.socket() as sock:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError as error:
            return type(error).__name__, 0.0

        async def send() -> None:
            for i, chunk in enumerate(chunks):
                if i and pause_s:
                    await asyncio.sleep(pause_s)
                if received:
                    return
                try:
                    await loop.sock_sendall(sock, chunk)
                except OSError:
                    return

        sender = asyncio.create_task(send())
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        data = await loop.sock_recv(sock, 65536)
                    except OSError:
                        ended = "reset"
                        break
                    if not data:
                        ended = "closed"
                        break
                    received += data
        except TimeoutError:
            ended = "open"
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    elapsed = time.monotonic() - started
    if received.startswith(b"HTTP/1."):
        status = received.split(b" ", 2)[1].decode("ascii", "replace")
        return (status if ended != "open" else f"{status}+open"), elapsed
    return ended, elapsed


CLIENTS: dict[str, Callable[[str, Tally, asyncio.Event, random.Random], Coroutine[Any, Any, None]]] = {
    "valid": valid_client,
    "invalid": invalid_client,
    "oversized": oversized_client,
    "slow": slow_client,
    "hangup": hangup_client,
}


def split(connections: int) -> dict[str, int]:
    """Connections per kind: ``SHARES`` of ``connections``, at least one each, the rest valid."""
    counts = {kind: max(1, math.floor(share * connections)) for kind, share in SHARES.items()}
    counts["valid"] = max(1, connections - sum(n for kind, n in counts.items() if kind != "valid"))
    return counts


# ------------------------------------------------------------------------------------------ the observers
@dataclass
class Watch:
    """The server's memory, descriptors and threads, and the version it says it serves, once a second."""

    samples: list[dict[str, float]] = field(default_factory=list)
    served: list[tuple[float, str]] = field(default_factory=list)
    """(time, version) each time ``/models/soak`` names a new version."""
    stalls: list[tuple[float, float]] = field(default_factory=list)
    """(start, seconds) of each time this process was stalled for ``STALL_S`` or more (the sampler woke
    late: a garbage collection, or the machine's other work): its clients then sent nothing."""


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (KiB), threads and open file descriptors of ``pid``."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = float(rest.split()[0])
    values["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    return values


def sample_memory(pid: int, tally: Tally, stop: threading.Event, into: Watch) -> None:
    """Once a second on the second, in a thread of its own so that a busy event loop does not delay it;
    a wake-up ``STALL_S`` late is a stall of this whole process."""
    tick = time.monotonic()
    while not stop.is_set():
        late = time.monotonic() - tick
        if late >= STALL_S:
            into.stalls.append((round(tally.now() - late, 2), round(late, 2)))
        with contextlib.suppress(OSError):
            into.samples.append({"t": round(tally.now(), 2), **proc_status(pid)})
        tick = max(tick + 1.0, time.monotonic())
        stop.wait(max(0.0, tick - time.monotonic()))


async def watch_version(url: str, tally: Tally, stop: asyncio.Event, into: Watch) -> None:
    """The version ``/models/soak`` names, once a second."""
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                version = str((await client.get(f"/models/{MODEL}")).json()["version"])
                if not into.served or into.served[-1][1] != version:
                    into.served.append((round(tally.now(), 2), version))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def move_alias(tracking_uri: str, duration_s: float, tally: Tally, moves: list[dict[str, Any]]) -> None:
    """``champion`` to version 2 at a third of the run, to version 3 at two thirds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for step, version in ((1, "2"), (2, "3")):
        await asyncio.sleep(max(0.0, step * duration_s / 3 - tally.now()))
        await asyncio.to_thread(client.set_registered_model_alias, MODEL, "champion", version)
        moves.append({"version": version, "alias_moved_s": round(tally.now(), 2)})
        print(f"soak: {tally.now():6.1f} s  alias champion -> version {version}", flush=True)


async def progress(tally: Tally, watched: Watch, stop: asyncio.Event, every_s: float) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        sent = sum(sum(c.values()) for c in tally.outcomes.values())
        rss = watched.samples[-1]["VmRSS"] / 1024 if watched.samples else float("nan")
        print(
            f"soak: {tally.now():6.1f} s  {sent} exchanges, {tally.wrong} wrong, {tally.client_5xx} 5xx, "
            f"{len(tally.problems)} not as expected, {len(watched.stalls)} stalls of the soak itself; "
            f"RSS {rss:.1f} MiB",
            flush=True,
        )


async def drive(
    url: str, pid: int, tracking_uri: str, args: argparse.Namespace
) -> tuple[Tally, Watch, list[dict[str, Any]]]:
    tally, watched = Tally(), Watch()
    moves: list[dict[str, Any]] = []
    stop = asyncio.Event()
    rng = random.Random(args.seed)  # noqa: S311 (test data)
    clients = [
        asyncio.create_task(CLIENTS[kind](url, tally, stop, random.Random(rng.random())))  # noqa: S311
        for kind, count in split(args.connections).items()
        for _ in range(count)
    ]
    sampling = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(pid, tally, sampling, watched), daemon=True)
    sampler.start()
    observers = [
        asyncio.create_task(watch_version(url, tally, stop, watched)),
        asyncio.create_task(progress(tally, watched, stop, args.progress)),
    ]
    mover = asyncio.create_task(move_alias(tracking_uri, args.duration, tally, moves))
    try:
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, deadline - time.monotonic()))
            if any(task.done() and task.exception() for task in [*clients, mover, *observers]):
                break  # a client crashed: stop and report it
        stop.set()
        sampling.set()  # the last sample is the end of the traffic
        # Clients finish what they are doing (the slowest, a slow client, within its deadline).
        _, pending = await asyncio.wait(clients, timeout=READ_TIMEOUT_S + 15.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *observers, return_exceptions=True)
        for task in [*clients, mover, *observers]:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("a soak task failed") from task.exception()
    finally:
        stop.set()
        sampling.set()
        for task in [*clients, *observers, mover]:
            task.cancel()
    return tally, watched, moves


# -------------------------------------------------------------------------------------------- the results
def server_counts(url: str) -> dict[str, Any]:
    """Statuses, refusals and reloads counted by the server (``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    statuses: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    reloads: Counter[str] = Counter()
    failures = 0.0
    rss = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "http_requests_total":
                statuses[labels["status"]] += int(sample.value)
            elif sample.name == "ferry_http_rejected_total":
                refused[labels["reason"]] += int(sample.value)
            elif sample.name == "ferry_requests_rejected_total":
                rejected[labels["reason"]] += int(sample.value)
            elif sample.name == "ferry_model_reloads_total":
                reloads[labels.get("result", "")] += int(sample.value)
            elif sample.name == "ferry_inference_failures_total":
                failures += sample.value
            elif sample.name == "process_resident_memory_bytes":
                rss = sample.value
    return {
        "statuses": dict(sorted(statuses.items())),
        "5xx": sum(n for status, n in statuses.items() if status.startswith("5")),
        "http_rejected": dict(refused),
        "requests_rejected": dict(rejected),
        "reloads": dict(reloads),
        "inference_failures": int(failures),
        "process_resident_memory_mib": round(rss / 2**20, 1),
    }


def log_errors(log: str) -> list[str]:
    lines = log.splitlines()
    return [line for line in lines if " ERROR " in line or "Traceback" in line or line.startswith("ERROR")]


def rss_figures(samples: list[dict[str, float]], warmup_s: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup_s]
    if not after:
        return {"warmup_s": warmup_s, "samples": len(samples)}
    first, last = after[0], after[-1]
    peak = max(s["VmRSS"] for s in after)
    return {
        "warmup_s": warmup_s,
        "warmup_at_s": first["t"],
        "warmup_mib": round(first["VmRSS"] / 1024, 1),
        "end_at_s": last["t"],
        "end_mib": round(last["VmRSS"] / 1024, 1),
        "max_mib": round(peak / 1024, 1),
        "start_mib": round(samples[0]["VmRSS"] / 1024, 1),
        "growth_pct": round(100 * (last["VmRSS"] - first["VmRSS"]) / first["VmRSS"], 2),
        "max_growth_pct": round(100 * (peak - first["VmRSS"]) / first["VmRSS"], 2),
        "hwm_mib": round(last.get("VmHWM", 0.0) / 1024, 1),
        "fds_warmup": int(first["fds"]),
        "fds_end": int(last["fds"]),
        "fds_max": int(max(s["fds"] for s in after)),
        "threads_warmup": int(first["Threads"]),
        "threads_end": int(last["Threads"]),
    }


def swaps(moves: list[dict[str, Any]], tally: Tally, watched: Watch) -> list[dict[str, Any]]:
    out = []
    for move in moves:
        version, previous = move["version"], str(int(move["version"]) - 1)
        served = [t for t, v in watched.served if v == version]
        seen, old = tally.versions.get(version), tally.versions.get(previous)
        out.append(
            {
                **move,
                "served_s": served[0] if served else None,
                "first_answer_s": round(seen["first_s"], 2) if seen else None,
                "last_answer_of_previous_s": round(old["last_s"], 2) if old else None,
            }
        )
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


EXCUSABLE = {"408", "closed", "reset"}
"""Outcomes a client that went silent for a while causes itself: the server's read timeouts."""


def classify(problems: list[dict[str, Any]], stalls: list[tuple[float, float]]) -> dict[str, Any]:
    """Problems split into those the soak's own stalls explain (an excusable outcome of an exchange that
    a stall overlapped) and the rest: how many of each kind, a few examples of each."""
    excused: list[dict[str, Any]] = []
    counted: list[dict[str, Any]] = []
    for problem in problems:
        overlapped = any(
            start <= problem["at_s"] and start + length >= problem["since_s"] for start, length in stalls
        )
        if overlapped and problem["outcome"] in EXCUSABLE and not problem.get("wrong"):
            excused.append(problem)
        else:
            counted.append(problem)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for problem in counted:
        if len(examples[problem["kind"]]) < EXAMPLES:
            examples[problem["kind"]].append(problem)
    return {
        "unexpected": dict(Counter(p["kind"] for p in counted)),
        "failed_valid": sum(1 for p in counted if p["kind"] == "valid" and not p.get("wrong")),
        "examples": dict(examples),
        "excused": dict(Counter(p["kind"] for p in excused)),
        "excused_examples": excused[:EXAMPLES],
    }


def results(
    args: argparse.Namespace,
    tally: Tally,
    watched: Watch,
    moves: list[dict[str, Any]],
    server: dict[str, Any],
    errors: list[str],
) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for key, outcomes in sorted(tally.outcomes.items()):
        kind, sub = key.split("/", 1)
        entry = by_kind.setdefault(kind, {"total": 0, "outcomes": Counter(), "subkinds": {}})
        entry["total"] += sum(outcomes.values())
        entry["outcomes"].update(outcomes)
        entry["subkinds"][sub] = dict(sorted(outcomes.items()))
    for entry in by_kind.values():
        entry["outcomes"] = dict(sorted(entry["outcomes"].items()))
    warmup_s = args.warmup if args.warmup is not None else min(60.0, 0.1 * args.duration)
    rss = rss_figures(watched.samples, warmup_s)
    answered = {v: seen["answers"] for v, seen in sorted(tally.versions.items())}
    problems = classify(tally.problems, watched.stalls)
    failed, unexpected = problems["failed_valid"], problems["unexpected"]
    checks = [
        _check("RSS growth after warm-up", rss.get("growth_pct", math.inf) < args.max_rss_growth,
               f"{rss.get('growth_pct')}% (limit {args.max_rss_growth:g}%)"),
        _check("no 5xx seen by a client", tally.client_5xx == 0, tally.client_5xx),
        _check("no 5xx counted by the server", server["5xx"] == 0, server["5xx"]),
        _check("no wrong answer to a valid request", tally.wrong == 0, tally.wrong),
        _check("every valid request answered 200", failed == 0 and sum(answered.values()) > 0,
               f"{failed} failed of {by_kind.get('valid', {}).get('total', 0)}"),
        _check("every client answered as expected", not unexpected, unexpected),
        _check("the alias followed twice (versions 1, 2, 3 answered)", sorted(answered) == ["1", "2", "3"],
               answered),
        _check("no ERROR in the server's log", not errors, len(errors)),
        _check("every kind of client ran", all(by_kind.get(k, {}).get("total") for k in CLIENTS),
               {k: by_kind.get(k, {}).get("total", 0) for k in CLIENTS}),
    ]  # fmt: skip
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "loadtests/soak.py", *args.argv]),
        "duration_s": args.duration,
        "connections": args.connections,
        "clients": split(args.connections),
        "settings": {**SOAK_ENV, **cache_env(args)},
        "machine": {
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "requests": by_kind,
        "valid": {
            "answered_by_version": answered,
            "wrong": tally.wrong,
            "failed": failed,
            "latency_ms": {
                "p50": round(percentile(tally.latencies_ms, 50), 2),
                "p99": round(percentile(tally.latencies_ms, 99), 2),
                "max": round(max(tally.latencies_ms, default=float("nan")), 2),
            },
        },
        "client_5xx": tally.client_5xx,
        "unexpected": unexpected,
        "examples": problems["examples"],
        "soak_stalls": watched.stalls,
        "excused": problems["excused"],
        "excused_examples": problems["excused_examples"],
        "closed_after_s": {
            key: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)}
            for key, v in sorted(tally.closed_after_s.items())
            if v
        },
        "swaps": swaps(moves, tally, watched),
        "served_versions": watched.served,
        "rss": rss,
        "server": server,
        "server_log_errors": errors[:20],
        "checks": checks,
        "passed": all(c["ok"] for c in checks),
        "samples": watched.samples,
    }


def _check(name: str, ok: bool, value: Any) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "value": value}


def summary(report: dict[str, Any]) -> str:
    rss = report["rss"]
    lines = [
        f"soak: {report['duration_s']:g} s at {report['connections']} connections {report['clients']}",
        "requests by kind and outcome (status, or what the connection did):",
    ]
    for kind, entry in report["requests"].items():
        lines.append(f"  {kind:9} {entry['total']:>8}  {entry['outcomes']}")
        for sub, outcomes in entry["subkinds"].items():
            lines.append(f"      {sub:15} {outcomes}")
    valid = report["valid"]
    lines += [
        f"valid answers by version: {valid['answered_by_version']}; wrong {valid['wrong']}, failed "
        f"{valid['failed']}; latency p50 {valid['latency_ms']['p50']} ms, "
        f"p99 {valid['latency_ms']['p99']} ms",
        f"5xx: {report['client_5xx']} seen by clients, {report['server']['5xx']} counted by the server; "
        f"server statuses {report['server']['statuses']}",
        f"server refusals {report['server']['http_rejected']}, "
        f"rejected {report['server']['requests_rejected']}, "
        f"reloads {report['server']['reloads']}",
    ]
    for swap in report["swaps"]:
        lines.append(
            f"swap to v{swap['version']}: alias moved at {swap['alias_moved_s']} s, served at "
            f"{swap['served_s']} s, first answer {swap['first_answer_s']} s, last answer of the previous "
            f"version {swap['last_answer_of_previous_s']} s"
        )
    if "growth_pct" in rss:
        lines.append(
            f"RSS: {rss['warmup_mib']} MiB at {rss['warmup_at_s']} s (after warm-up), "
            f"{rss['end_mib']} MiB at the end ({rss['end_at_s']} s), max {rss['max_mib']} MiB: "
            f"growth {rss['growth_pct']}% "
            f"(max {rss['max_growth_pct']}%); fds {rss['fds_warmup']} -> {rss['fds_end']} (max "
            f"{rss['fds_max']}), threads {rss['threads_warmup']} -> {rss['threads_end']}"
        )
    stalls = report["soak_stalls"]
    if stalls:
        lines.append(
            f"the soak itself stalled {len(stalls)} times (longest {max(s for _, s in stalls):.1f} s); "
            f"excused as the effect of its silent clients: {report['excused'] or 'none'}"
        )
    for check in report["checks"]:
        lines.append(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['value']}")
    lines.append(f"soak: {'PASSED' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def cache_env(args: argparse.Namespace) -> dict[str, str]:
    return {
        "FERRY_CACHE__MEMORY_BYTES": str(args.cache_bytes),
        "FERRY_CACHE__RESPONSE_BYTES": str(args.response_cache_bytes),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description="Soak a real Ferry with mixed traffic.")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--connections", type=int, default=64, help="clients at once (default 64)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "reports" / "soak", help="results folder"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the RSS baseline (default 10%%, at most 60)",
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=10.0, help="RSS growth limit, %% (default 10)"
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=4 * 2**20,
        help="FERRY_CACHE__MEMORY_BYTES (default 4 MiB: full within the warm-up, so that growth after it "
        "is not the cache filling up to its bound)",
    )
    parser.add_argument(
        "--response-cache-bytes",
        type=int,
        default=2 * 2**20,
        help="FERRY_CACHE__RESPONSE_BYTES (default 2 MiB)",
    )
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--keep", action="store_true", help="keep the registry and downloads in --out")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.duration <= 0 or args.connections < len(SHARES):
        parser.error(f"--duration must be positive and --connections at least {len(SHARES)}")
    return args


def start_ferry(tracking_uri: str, workdir: Path, log_path: Path, args: argparse.Namespace) -> procs.Server:
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "FERRY_MODELS": f"{MODEL}=models:/{MODEL}@champion",
        "FERRY_DOWNLOAD_DIR": str(workdir / "downloads"),
        "PYTHONUNBUFFERED": "1",
        **SOAK_ENV,
        **cache_env(args),
    }
    argv = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = procs.launch("ferry", argv, log_path, url=f"http://127.0.0.1:{port}", env=env, cwd=ROOT)
    try:
        procs.wait_ready(server, "/health/ready", 180.0)
    except BaseException:
        procs.stop_server(server)
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends the run as Ctrl-C does: everything started is stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    server: procs.Server | None = None
    workdir = Path(tempfile.mkdtemp(prefix="ferry-soak-")) if not args.keep else args.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"soak: registry in {workdir}", flush=True)
        tracking_uri = build_registry(workdir)
        # What torch and MLflow left in memory is never garbage: out of the collector's way, so that a
        # full collection does not stall every client for seconds.
        gc.collect()
        gc.freeze()
        server = start_ferry(tracking_uri, workdir, args.out / "ferry.log", args)
        print(
            f"soak: Ferry pid {server.process.pid} on {server.url}; {args.duration:g} s at "
            f"{args.connections} connections {split(args.connections)}; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        tally, watched, moves = asyncio.run(drive(server.url, server.process.pid, tracking_uri, args))
        if server.process.poll() is not None:
            raise RuntimeError(
                f"Ferry exited with {server.process.returncode}:\n{server.log(procs.LOG_TAIL)}"
            )
        counts = server_counts(server.url)
        errors = log_errors(server.log())
        report = results(args, tally, watched, moves, counts, errors)
        (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
        print(summary(report))
        print(f"soak: {args.out / 'soak.json'}, server log {args.out / 'ferry.log'}")
        return 0 if report["passed"] else 1
    except KeyboardInterrupt:
        print("soak: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            procs.stop_server(server, timeout_s=15)
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
