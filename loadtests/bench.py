"""Ferry's side-by-side benchmark: Ferry, ``mlflow models serve`` and a bare FastAPI floor, one after
another on this machine, driven by wrk with the same bodies.

    make bench                                   # the published run: 20 s per scenario, docs regenerated
    .venv/bin/python loadtests/bench.py --duration 5 --warmup 2      # a quick look
    .venv/bin/python loadtests/bench.py --servers ferry,floor --scenarios onnx-1row

Scenarios (each after a warm-up with the same load):

- single-row ``tabular-mlp-onnx`` and ``tabular-mlp`` at 1, 16 and 64 connections, the cache off and
  every request's input unique;
- one ``image-cnn`` image (about 128 KB of JSON) at 16 connections, Ferry with batching on and off;
- 256-row ``tabular-mlp-onnx`` requests (rows/s) against ONNX Runtime called in-process at batch 256
  with one intra-op thread, as Ferry runs it (the ceiling);
- a memory-cache hit and a Redis-cache hit (a ``redis-server`` is started on a free port unless
  ``FERRY_REDIS_URL`` names one).

Writes ``bench/results/<date>-<host>.json`` and ``.png``, prints the Markdown report, and with
``--docs`` regenerates ``docs/benchmarks.md``. Targets come from ``loadtests/thresholds.toml``
(``[targets]``); they are reported as met or missed, never asserted. The exit status is 1 only when a
scenario could not be run (a server did not start, or answered a check request wrongly).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import itertools
import json
import os
import platform
import re
import resource
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procs  # noqa: E402

ROOT = procs.ROOT
WRK_SCRIPT = HERE / "wrk" / "post.lua"
THRESHOLDS = HERE / "thresholds.toml"
DEFAULT_TRACKING_URI = "sqlite:///.ferry/mlflow.db"
ALIAS = "champion"
ONNX, TORCH, CNN = "tabular-mlp-onnx", "tabular-mlp", "image-cnn"
FEATURES, IMAGE = 64, (3, 64, 64)
UNIQUE = "__N__"
"""Token in a body that wrk's script replaces by a fresh integer per request (``wrk/post.lua``)."""
KEEP_ENV = ("FERRY_DEVICE", "FERRY_REDIS_URL")
"""Ferry settings taken from the caller's environment; every other ``FERRY_*`` is the benchmark's."""


# --------------------------------------------------------------------------------------- definitions
@dataclass(frozen=True)
class Instance:
    """One server process configuration. Runs against it happen while it is up, then it stops."""

    key: str
    server: str  # "ferry", "mlflow" or "floor"
    variant: str  # how this Ferry is configured ("" for the default: batching on, cache off)
    models: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


INSTANCES = {
    i.key: i
    for i in (
        Instance("ferry", "ferry", "", (ONNX, TORCH, CNN), (("FERRY_CACHE__ENABLED", "false"),)),
        Instance(
            "ferry-nobatch",
            "ferry",
            "batching off",
            (CNN,),
            (("FERRY_CACHE__ENABLED", "false"), ("FERRY_BATCH__ENABLED", "false")),
        ),
        Instance("ferry-memory", "ferry", "memory cache", (ONNX,), (("FERRY_CACHE__ENABLED", "true"),)),
        Instance(
            "ferry-redis",
            "ferry",
            "Redis cache",
            (ONNX,),
            (
                ("FERRY_CACHE__ENABLED", "true"),
                ("FERRY_CACHE__MEMORY_BYTES", "0"),
                ("FERRY_CACHE__RESPONSE_BYTES", "0"),
            ),
        ),
        Instance(f"mlflow:{ONNX}", "mlflow", "", (ONNX,)),
        Instance(f"mlflow:{TORCH}", "mlflow", "", (TORCH,)),
        Instance(f"mlflow:{CNN}", "mlflow", "", (CNN,)),
        Instance("floor", "floor", ""),
    )
}
ORDER = ["ferry", "ferry-nobatch", "ferry-memory", "ferry-redis", f"mlflow:{ONNX}", f"mlflow:{TORCH}"]
ORDER += [f"mlflow:{CNN}", "floor"]
"""Servers start one after another in this order; each runs all its scenarios while it is up."""


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    model: str
    rows: int
    connections: int
    unique: bool
    instances: tuple[str, ...]
    expect_cache_hit: bool = False
    protocol: str = "predict"
    """``predict``: Ferry's and the floor's ``/predict``, MLflow's ``/invocations``; ``v2-binary``: the
    Open Inference Protocol with the binary tensor extension (Ferry; the floor parses its JSON header)."""


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for model, short in ((ONNX, "onnx"), (TORCH, "torch")):
        for conns in (1, 16, 64):
            out.append(
                Scenario(
                    f"{short}-1row-c{conns}",
                    f"{model}, 1 row, {conns} conn",
                    model,
                    1,
                    conns,
                    True,
                    ("ferry", f"mlflow:{model}", "floor"),
                )
            )
    out.append(
        Scenario(
            "cnn-1img-c16",
            f"{CNN}, 1 image, 16 conn",
            CNN,
            1,
            16,
            True,
            ("ferry", "ferry-nobatch", f"mlflow:{CNN}", "floor"),
        )
    )
    out.append(
        Scenario(
            "onnx-256rows-c16",
            f"{ONNX}, 256 rows, 16 conn",
            ONNX,
            256,
            16,
            True,
            ("ferry", f"mlflow:{ONNX}", "floor"),
        )
    )
    out.append(
        Scenario(
            "onnx-256rows-v2bin-c16",
            f"{ONNX}, 256 rows as v2 binary tensors, 16 conn",
            ONNX,
            256,
            16,
            False,
            ("ferry", "floor"),
            protocol="v2-binary",
        )
    )
    out.append(
        Scenario(
            "onnx-1row-cachehit-c64",
            f"{ONNX}, 1 row repeated (cache hit), 64 conn",
            ONNX,
            1,
            64,
            False,
            ("ferry-memory", "ferry-redis", "floor"),
            expect_cache_hit=True,
        )
    )
    return out


# --------------------------------------------------------------------------------------------- bodies
def rows_json(model: str, rows: int, seed: int = 7) -> str:
    """``rows`` inputs as JSON text, rounded like a real client's, the first number replaced by the
    ``__N__`` token (unquoted) so that each request can carry a unique input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if model == CNN:
        value: Any = rng.random((rows, *IMAGE)).round(7).tolist()
        value[0][0][0][0] = UNIQUE
    else:
        value = rng.standard_normal((rows, FEATURES)).round(4).tolist()
        value[0][0] = UNIQUE
    return json.dumps(value).replace(f'"{UNIQUE}"', UNIQUE)


V2_HEADER = "Inference-Header-Content-Length"


def body_for(server: str, scenario: Scenario, rows_text: str) -> tuple[bytes, dict[str, str]]:
    """The body and extra headers of the scenario's requests to ``server``."""
    if scenario.protocol == "v2-binary":
        return v2_binary(scenario.rows)
    model, unique = scenario.model, scenario.unique
    text = (
        f'{{"inputs": {rows_text}}}'
        if server == "mlflow"
        else f'{{"model": "{model}", "inputs": {rows_text}}}'
    )
    return (text if unique else text.replace(UNIQUE, "0.5")).encode(), {}


def v2_binary(rows: int, seed: int = 7) -> tuple[bytes, dict[str, str]]:
    """A v2 inference request for ``tabular-mlp-onnx`` with the input and the output as raw float32
    (binary tensor data extension): the JSON header, then ``rows`` x 64 little-endian floats."""
    import numpy as np

    data = np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + data, {"Content-Type": "application/octet-stream", V2_HEADER: str(len(header))}


def path_for(server: str, scenario: Scenario) -> str:
    if scenario.protocol == "v2-binary":
        return f"/v2/models/{scenario.model}/infer"
    return "/invocations" if server == "mlflow" else "/predict"


# -------------------------------------------------------------------------------------------- results
@dataclass
class Run:
    scenario: str
    title: str
    server: str
    variant: str
    connections: int
    rows_per_request: int
    requests: int = 0
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0
    non_2xx: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    """wrk's error counts by kind (connect, read, write, status: non-2xx/3xx answers, timeout)."""
    server_cpu_pct: float = 0.0
    server_cpu_us_per_request: float = 0.0
    generator_cpu_pct: float = 0.0
    other_cpu_cores: float = 0.0
    """CPU used on the machine by everything except the server and wrk during the run (cores)."""
    failure: str = ""
    attempts: int = 1
    """Measurements made; more than one when other work on the machine disturbed the first (the least
    disturbed is kept)."""

    @property
    def label(self) -> str:
        return f"{self.server} ({self.variant})" if self.variant else self.server


@dataclass
class Report:
    meta: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "runs": [asdict(r) | {"label": r.label} for r in self.runs],
            "ratios": self.ratios,
            "targets": self.targets,
        }


# ------------------------------------------------------------------------------------------------ wrk
def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``, all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str, body_file: Path, unique: bool, headers: dict[str, str], connections: int, duration_s: float
) -> tuple[dict[str, Any], float]:
    """One wrk run: its ``WRK_JSON`` summary and wrk's own CPU time (seconds)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s"]
    argv += ["-s", str(WRK_SCRIPT), url, "--", str(body_file), "unique" if unique else "static"]
    argv += [f"{name}: {value}" for name, value in headers.items()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    match = re.search(r"^WRK_JSON (.*)$", completed.stdout, re.MULTILINE)
    if completed.returncode != 0 or match is None:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stdout[-500:]} {completed.stderr[-500:]}"
        )
    return json.loads(match.group(1)), cpu


SETTLE_S = 2.0
"""Pause after the warm-up: requests still queued in the server when wrk hung up finish first (else
the measured run's first requests could find Ferry's row-bounded queue full and get 503)."""


def measure(
    server: procs.Server,
    scenario: Scenario,
    instance: Instance,
    body: bytes,
    headers: dict[str, str],
    workdir: Path,
    args: argparse.Namespace,
) -> Run:
    run = Run(
        scenario.id, scenario.title, instance.server, instance.variant, scenario.connections, scenario.rows
    )
    url = server.url + path_for(instance.server, scenario)
    check(url, body, headers, instance, scenario)
    body_file = workdir / f"{scenario.id}-{instance.key.replace(':', '-')}.body"
    body_file.write_bytes(body)
    load = (url, body_file, scenario.unique, headers, scenario.connections)
    if args.warmup > 0:
        run_wrk(*load, args.warmup)
        time.sleep(SETTLE_S)
    cpu_before, busy_before = server.cpu_seconds(), _busy_cpu_seconds()
    summary, wrk_cpu = run_wrk(*load, args.duration)
    server_cpu = server.cpu_seconds() - cpu_before
    busy = _busy_cpu_seconds() - busy_before
    seconds = summary["duration_us"] / 1e6
    latency, errors = summary["latency_us"], summary["errors"]
    run.requests = summary["requests"]
    run.duration_s = round(seconds, 2)
    run.requests_per_s = round(run.requests / seconds, 1)
    run.rows_per_s = round(run.requests * scenario.rows / seconds, 1)
    run.p50_ms, run.p90_ms = latency["p50"] / 1000, latency["p90"] / 1000
    run.p99_ms, run.max_ms = latency["p99"] / 1000, latency["max"] / 1000
    run.non_2xx = errors["status"]
    run.errors = sum(errors.values())
    run.error_kinds = {k: v for k, v in errors.items() if v}
    run.server_cpu_pct = round(100 * server_cpu / seconds, 1)
    run.server_cpu_us_per_request = round(1e6 * server_cpu / max(run.requests, 1), 1)
    run.generator_cpu_pct = round(100 * wrk_cpu / seconds, 1)
    run.other_cpu_cores = round(max(0.0, busy - server_cpu - wrk_cpu) / seconds, 2)
    return run


def check(url: str, body: bytes, headers: dict[str, str], instance: Instance, scenario: Scenario) -> None:
    """One request before the load: it must answer 200 with outputs, and a hit where one is expected."""
    sample = body.replace(UNIQUE.encode(), b"0.5") if scenario.unique else body
    expect_hit = scenario.expect_cache_hit and instance.server == "ferry"
    for attempt in range(2 if expect_hit else 1):
        status, answer_headers, content = procs.http_post(url, sample, headers, timeout_s=60)
        if status != 200:
            raise RuntimeError(f"check request to {url} answered {status}: {content[:300]!r}")
        if instance.server == "ferry" and b'"outputs"' not in content:
            raise RuntimeError(f"check request to {url} has no outputs: {content[:300]!r}")
        if attempt == 1 and answer_headers.get("x-cache") != "hit":
            raise RuntimeError(
                f"the repeated request to {url} was not a cache hit (X-Cache {answer_headers.get('x-cache')})"
            )


# -------------------------------------------------------------------------------------------- servers
@contextlib.contextmanager
def redis_url(workdir: Path) -> Iterator[str | None]:
    """``FERRY_REDIS_URL`` when set; else a ``redis-server`` of our own on a free port (stopped after)."""
    configured = os.environ.get("FERRY_REDIS_URL")
    if configured:
        yield configured
        return
    if shutil.which("redis-server") is None:
        yield None
        return
    redis = procs.RedisServer(workdir)
    try:
        redis.start()
        yield redis.url
    finally:
        redis.stop()


def base_env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in procs.venv_env().items() if not k.startswith("FERRY_") or k in KEEP_ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def start(
    instance: Instance, tracking_uri: str, redis: str | None, logs: Path, models: tuple[str, ...] = ()
) -> procs.Server:
    """Start one server; a Ferry serves ``models`` (default: all of the instance's)."""
    port = procs.free_port()
    env = base_env(tracking_uri)
    if instance.server == "ferry":
        env["FERRY_MODELS"] = ",".join(f"{m}=models:/{m}@{ALIAS}" for m in models or instance.models)
        env |= dict(instance.env)
        if instance.key == "ferry-redis":
            if redis is None:
                raise RuntimeError("no Redis: set FERRY_REDIS_URL or install redis-server")
            env["FERRY_REDIS_URL"] = redis
        else:
            env.pop("FERRY_REDIS_URL", None)
        argv = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return procs.start_server(instance.key, argv, port, "/health/ready", logs, env, timeout_s=300)
    if instance.server == "mlflow":
        mlflow = str(Path(sys.executable).parent / "mlflow")
        argv = [mlflow, "models", "serve", "-m", f"models:/{instance.models[0]}@{ALIAS}"]
        argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        return procs.start_server(
            instance.key.replace(":", "-"), argv, port, "/ping", logs, env, timeout_s=300
        )
    argv = [sys.executable, str(HERE / "floor.py"), "--port", str(port)]
    return procs.start_server("floor", argv, port, "/health/ready", logs, env, timeout_s=60)


# ---------------------------------------------------------------------------------- in-process ceiling
def onnx_ceiling(tracking_uri: str, rows: int, duration_s: float) -> Run:
    """ONNX Runtime on the registered ``tabular-mlp-onnx``, called in this process at batch ``rows``
    with one intra-op thread (as Ferry runs it): the most rows/s any server could reach."""
    import mlflow
    import numpy as np
    import onnxruntime as ort

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{ONNX}@{ALIAS}", dst_path=tmp))
        model_file = next(local.rglob("*.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if os.environ.get("FERRY_DEVICE", "").startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(model_file), options, providers=providers)
    x = np.random.default_rng(0).standard_normal((rows, FEATURES)).astype(np.float32)
    name = session.get_inputs()[0].name
    provider = session.get_providers()[0].removesuffix("ExecutionProvider")
    run = Run(f"onnx-{rows}rows-c16", "", "in-process", f"onnxruntime {provider}, batch {rows}", 1, rows)
    return _timed(run, lambda: session.run(None, {name: x}), duration_s)


def torch_inprocess(tracking_uri: str, batch: int, duration_s: float) -> Run:
    """``image-cnn`` loaded as Ferry loads it (``mlflow.pytorch.load_model``) and called in this process
    on the CPU with one thread at batch ``batch``: with batch 1, how much batching can gain here."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    module = _load_torch(tracking_uri)
    x = torch.from_numpy(np.random.default_rng(0).random((batch, *IMAGE), dtype=np.float32))

    def call() -> None:
        with torch.inference_mode():
            module(x)

    run = Run("cnn-1img-c16", "", "in-process", f"torch CPU, batch {batch}", 1, batch)
    return _timed(run, call, duration_s)


@functools.cache
def _load_torch(tracking_uri: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(f"models:/{CNN}@{ALIAS}", map_location="cpu")


def _timed(run: Run, call: Any, duration_s: float) -> Run:
    """Fill ``run`` with the rate and latency of ``call()`` repeated for ``duration_s`` seconds."""
    warm = time.perf_counter()
    for i in itertools.count():  # the first calls at a new shape allocate and plan: at least 1 s, 10 calls
        call()
        if i >= 10 and time.perf_counter() - warm > 1.0:
            break
    times: list[float] = []
    busy0, cpu0, started = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    while time.perf_counter() - started < duration_s:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    run.other_cpu_cores = round(max(0.0, _busy_cpu_seconds() - busy0 - cpu) / elapsed, 2)
    times.sort()
    n = len(times)
    run.requests, run.duration_s = n, round(elapsed, 2)
    run.requests_per_s = round(n / elapsed, 1)
    run.rows_per_s = round(n * run.rows_per_request / elapsed, 1)
    run.p50_ms = round(1000 * times[n // 2], 3)
    run.p90_ms = round(1000 * times[int(n * 0.9)], 3)
    run.p99_ms = round(1000 * times[int(n * 0.99)], 3)
    run.max_ms = round(1000 * times[-1], 3)
    run.server_cpu_pct = round(100 * cpu / elapsed, 1)
    run.server_cpu_us_per_request = round(1e6 * cpu / n, 1)
    return run


# ------------------------------------------------------------------------------------ ratios, targets
def find(runs: Sequence[Run], scenario: str, server: str, variant: str | None = None) -> Run | None:
    for run in runs:
        same = run.scenario == scenario and run.server == server
        if same and (variant is None or run.variant == variant) and not run.failure:
            return run
    return None


CEILING_OF = {"onnx-256rows-v2bin-c16": "onnx-256rows-c16"}
"""Scenarios compared with another scenario's in-process runs (the same model and rows)."""


def ratios(runs: Sequence[Run]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        if run.server != "ferry" or run.failure:
            continue
        mlflow, floor = find(runs, run.scenario, "mlflow"), find(runs, run.scenario, "floor")
        related = CEILING_OF.get(run.scenario, run.scenario)
        inprocess = [r for r in runs if r.server == "in-process" and r.scenario == related]
        ceiling = max(inprocess, key=lambda r: r.rows_per_s, default=None)
        out.append(
            {
                "scenario": run.scenario,
                "ferry": run.label,
                "throughput_vs_mlflow": _ratio(run.requests_per_s, mlflow.requests_per_s if mlflow else None),
                "p99_mlflow_over_ferry": _ratio(mlflow.p99_ms if mlflow else None, run.p99_ms),
                "throughput_vs_floor": _ratio(run.requests_per_s, floor.requests_per_s if floor else None),
                "rows_vs_inprocess": _ratio(run.rows_per_s, ceiling.rows_per_s if ceiling else None),
            }
        )
    return out


def observations(runs: Sequence[Run]) -> list[str]:
    """Facts from this run that explain the ratios: CPU per request against the floor's, and what the
    in-process runs say the model alone allows."""
    notes = []
    for sid in ("onnx-1row-c64", "torch-1row-c64", "onnx-1row-cachehit-c64"):
        floor = find(runs, sid, "floor")
        for ferry in (r for r in runs if r.scenario == sid and r.server == "ferry" and not r.failure):
            if floor is not None:
                own, base = ferry.server_cpu_us_per_request, floor.server_cpu_us_per_request
                notes.append(
                    f"{sid}: {ferry.label} used {own:.0f} µs of CPU per request, the floor {base:.0f} µs: "
                    f"{own - base:.0f} µs per request are Ferry's own work."
                )
    floor, ort = find(runs, "onnx-256rows-c16", "floor"), find(runs, "onnx-256rows-c16", "in-process")
    json_run, binary = find(runs, "onnx-256rows-c16", "ferry"), find(runs, "onnx-256rows-v2bin-c16", "ferry")
    if floor and ort:
        text = (
            f"onnx-256rows-c16: the floor, which only parses the JSON, reaches "
            f"{floor.rows_per_s / ort.rows_per_s:.0%} of the in-process rows/s "
            f"({floor.server_cpu_us_per_request:.0f} µs of CPU per request to parse 256 rows of JSON, "
            f"against {ort.server_cpu_us_per_request:.0f} µs for the model call)"
        )
        if json_run:
            text += f"; Ferry spends {json_run.server_cpu_us_per_request:.0f} µs per request"
        if binary:
            text += (
                f"; through v2 binary tensors Ferry reaches {binary.rows_per_s / ort.rows_per_s:.0%} "
                f"({binary.server_cpu_us_per_request:.0f} µs per request)"
            )
        notes.append(text + ".")
    one = find(runs, "cnn-1img-c16", "in-process", "torch CPU, batch 1")
    sixteen = find(runs, "cnn-1img-c16", "in-process", "torch CPU, batch 16")
    if one and sixteen:
        notes.append(
            f"cnn-1img-c16: in-process, batch 16 gives {sixteen.rows_per_s / one.rows_per_s:.2f}x the "
            f"images/s of batch 1 ({1e3 / one.rows_per_s:.2f} vs {1e3 / sixteen.rows_per_s:.2f} ms per "
            "image, one CPU thread): the most batching can gain for this model on this machine, even with "
            "free HTTP and JSON."
        )
    wrk = [r for r in runs if r.server not in ("in-process",) and not r.failure]
    if wrk:
        busiest = max(wrk, key=lambda r: r.generator_cpu_pct)
        notes.append(
            f"The load generator used at most {busiest.generator_cpu_pct:.0f}% of one core "
            f"({busiest.scenario}, {busiest.label})."
        )
    return notes


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def load_config(path: Path = THRESHOLDS) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def targets(runs: Sequence[Run], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ``[[targets]]`` entry of the thresholds file: ``a`` (scenario, server, variant, metric) over
    ``b`` must be at least ``min``."""
    out = []
    for target in config.get("targets", []):
        a, b = find(runs, *_ref(target["a"])), find(runs, *_ref(target["b"]))
        value = _ratio(
            getattr(a, target["a"]["metric"]) if a else None, getattr(b, target["b"]["metric"]) if b else None
        )
        out.append(
            {
                "name": target["name"],
                "min": target["min"],
                "value": value,
                "met": None if value is None else value >= target["min"],
            }
        )
    return out


def _ref(ref: dict[str, str]) -> tuple[str, str, str | None]:
    return ref["scenario"], ref["server"], ref.get("variant")


# ------------------------------------------------------------------------------------------ reporting
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ferry", "mlflow", "onnxruntime", "torch", "fastapi", "uvicorn", "orjson", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    for tool, argv in (("wrk", ["wrk", "-v"]), ("redis-server", ["redis-server", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            first = (text.stdout or text.stderr).splitlines()[0].strip()
            found = re.search(r"(?:wrk |v=)(\S+)", first)
            out[tool] = found.group(1) if found else first
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
            )
            gpus = [line for line in text.stdout.splitlines() if line.strip()]
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "gpus": gpus,
        "ferry_device": os.environ.get("FERRY_DEVICE", "auto"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    lines = [
        "| scenario | server | conns | req/s | rows/s | p50 ms | p99 ms | errors | server CPU µs/req "
        "| wrk CPU % | other CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.runs:
        if r.failure:
            lines.append(f"| {r.scenario} | {r.label} | {r.connections} | failed: {r.failure[:80]} |||||||")
            continue
        lines.append(
            f"| {r.scenario} | {r.label} | {r.connections} | {_fmt(r.requests_per_s)} | "
            f"{_fmt(r.rows_per_s)} | {_fmt(r.p50_ms, 2)} | {_fmt(r.p99_ms, 2)} | {r.errors} | "
            f"{_fmt(r.server_cpu_us_per_request)} | {_fmt(r.generator_cpu_pct)} | "
            f"{_fmt(r.other_cpu_cores, 2)} |"
        )
    lines += [
        "",
        "| scenario | Ferry | Ferry/MLflow req/s | MLflow p99 / Ferry p99 | Ferry/floor req/s "
        "| Ferry/in-process rows/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in report.ratios:
        lines.append(
            f"| {x['scenario']} | {x['ferry']} | {_fmt(x['throughput_vs_mlflow'], 2)} | "
            f"{_fmt(x['p99_mlflow_over_ferry'], 2)} | {_fmt(x['throughput_vs_floor'], 2)} | "
            f"{_fmt(x['rows_vs_inprocess'], 2)} |"
        )
    lines += ["", "| target | measured | required | met |", "|---|---:|---:|---|"]
    for t in report.targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_fmt(t['value'], 2)} | ≥ {t['min']} | {met} |")
    return "\n".join(lines) + "\n"


def chart(report: Report, path: Path) -> None:
    """Throughput (rows/s: req/s for one-row requests) and p99 per scenario, one bar per server run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    runs = [r for r in report.runs if not r.failure]
    labels = list(dict.fromkeys(r.label for r in runs))
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    positions, ticks, y = [], [], 0.0
    for sid in dict.fromkeys(r.scenario for r in runs):
        group = [r for r in runs if r.scenario == sid]
        positions += [(y + i, r) for i, r in enumerate(group)]
        ticks.append((y + (len(group) - 1) / 2, sid))
        y += len(group) + 1.0
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.2 + 0.22 * y))
    for ax, metric, title in (
        (axes[0], "rows_per_s", "throughput, rows/s (log scale)"),
        (axes[1], "p99_ms", "p99 latency, ms (log scale)"),
    ):
        shown = [(pos, run) for pos, run in positions if getattr(run, metric) > 0]
        ax.barh(
            [pos for pos, _ in shown],
            [getattr(run, metric) for _, run in shown],
            height=0.85,
            color=[colors[run.label] for _, run in shown],
        )
        for pos, run in shown:
            value = getattr(run, metric)
            ax.text(value, pos, f" {value:,.0f}" if value >= 10 else f" {value:.2g}", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_yticks([t for t, _ in ticks], [name for _, name in ticks])
        ax.set_ylim(y - 0.5, -1.0)
        ax.set_title(title)
        ax.grid(axis="x", which="both", alpha=0.3)
    handles = [Patch(color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    meta = report.meta
    where = meta["machine"]["cpu"] or meta["machine"]["host"]
    fig.suptitle(f"Ferry benchmark, {meta['date'][:10]}, {where}, {meta['machine']['cores']} cores")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def docs(report: Report, table: str, chart_path: Path | None, docs_path: Path) -> None:
    """Fill ``loadtests/benchmarks.md.in`` (the prose lives there) with this run's numbers."""
    meta, m = report.meta, report.meta["machine"]
    vs_mlflow = next((t for t in report.targets if t["name"] == HEADLINE), None)
    onnx64 = next(
        (x for x in report.ratios if x["scenario"] == "onnx-1row-c64" and x["ferry"] == "ferry"), None
    )
    headline = ""
    if vs_mlflow and vs_mlflow["value"] is not None:
        headline = (
            f"**Headline:** single-row `tabular-mlp-onnx` at 64 connections, Ferry serves "
            f"**{vs_mlflow['value']:.1f}x** the requests/s of `mlflow models serve`"
        )
        if onnx64 and onnx64["throughput_vs_floor"]:
            headline += f", {onnx64['throughput_vs_floor']:.0%} of the bare HTTP floor's"
        headline += f", on {m['cores']} CPU cores ({meta['date'][:10]})."
    busy = (
        " (other work was running: see the `other CPU` column)" if m["load_average_at_start"][0] > 1.5 else ""
    )
    chart_line = ""
    if chart_path is not None:
        chart_line = f"![throughput and p99 per scenario]({os.path.relpath(chart_path, docs_path.parent)})"
    values = {
        "headline": headline,
        "duration": f"{meta['duration_s']:g}",
        "warmup": f"{meta['warmup_s']:g}",
        "command": meta["command"],
        "host": m["host"],
        "cpu": m["cpu"] or "unknown CPU",
        "cores": str(m["cores"]),
        "memory": f"{m['memory_gib']:g}",
        "platform": m["platform"],
        "gpu": ", ".join(m["gpus"]) if m["gpus"] else "none, this run used the CPU",
        "device": m["ferry_device"],
        "load": ", ".join(str(x) for x in m["load_average_at_start"]) + busy,
        "versions": ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "table": table.rstrip(),
        "chart": chart_line,
        "results_file": meta["results_file"],
        "notes": "\n".join(f"- {n}" for n in meta["notes"]) or "- none",
    }
    template = string.Template((HERE / "benchmarks.md.in").read_text())
    docs_path.write_text(template.substitute(values))


HEADLINE = "tabular-mlp-onnx 1 row, 64 conn: req/s, Ferry / MLflow"
"""The target whose value is the headline ratio (a name in ``thresholds.toml``)."""


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ferry bench", description="Benchmark Ferry against mlflow models serve and the HTTP floor."
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured run (default 20)")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of the same load before each run (default 5)"
    )
    parser.add_argument(
        "--servers", default="ferry,mlflow,floor", help="comma-separated subset of ferry,mlflow,floor"
    )
    parser.add_argument("--scenarios", default="", help="comma-separated scenario id prefixes (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument(
        "--docs", type=Path, default=None, help="regenerate this Markdown page (docs/benchmarks.md)"
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--busy-cores",
        type=float,
        default=0.3,
        help="other work on the machine (cores) above which a run is measured again (default 0.3)",
    )
    parser.add_argument("--busy-retries", type=int, default=2, help="at most this many extra measurements")
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="measure nothing: publish this results JSON again (chart, --docs, --note added)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs in this folder")
    parser.add_argument(
        "--note", action="append", default=[], help="a note to keep with the results (repeat)"
    )
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_results is not None:
        return republish(args.from_results, args)
    if shutil.which("wrk") is None:
        print("bench: wrk is missing: run `make tools` (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    servers = {s.strip() for s in args.servers.split(",") if s.strip()}
    prefixes = [p.strip() for p in args.scenarios.split(",") if p.strip()]
    chosen = [s for s in scenarios() if not prefixes or any(s.id.startswith(p) for p in prefixes)]
    config = load_config()
    now = dt.datetime.now(dt.UTC)
    stem = f"{now:%Y-%m-%d}-{socket.gethostname()}"
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / f"{stem}.json"
    python = Path(sys.executable)
    python_text = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else python.name
    command = " ".join([python_text, "loadtests/bench.py", *(argv if argv is not None else sys.argv[1:])])
    report = Report(
        meta={
            "date": now.isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": versions(),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "command": command,
            "generator": "wrk -t1 --timeout 10s -s loadtests/wrk/post.lua",
            "results_file": os.path.relpath(results_file, ROOT),
            "notes": list(args.note),
        }
    )
    print(
        f"bench: {len(chosen)} scenarios, {args.duration:g} s each after {args.warmup:g} s warm-up; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    failed = False
    cuda = os.environ.get("FERRY_DEVICE", "").startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        workdir = Path(tmp)
        inprocess_s = min(args.duration, 10.0)
        if any(s.rows == 256 for s in chosen) and "ferry" in servers:
            print("bench: onnxruntime in-process at batch 256", flush=True)
            ceiling = functools.partial(onnx_ceiling, args.tracking_uri, 256, inprocess_s)
            report.runs.append(quietest(ceiling, args))
        if any(s.model == CNN for s in chosen) and "ferry" in servers and not cuda:
            print("bench: image-cnn in-process (torch, CPU) at batch 1 and 16", flush=True)
            for batch in (1, 16):
                once = functools.partial(torch_inprocess, args.tracking_uri, batch, inprocess_s)
                report.runs.append(quietest(once, args))
        with redis_url(workdir) as redis:
            for key in ORDER:
                instance = INSTANCES[key]
                todo = [s for s in chosen if key in s.instances]
                if instance.server not in servers or not todo:
                    continue
                failed |= not run_instance(instance, todo, args, redis, workdir, report)
    report.runs.sort(key=lambda r: ([s.id for s in scenarios()].index(r.scenario), _server_rank(r)))
    report.ratios = ratios(report.runs)
    report.targets = targets(report.runs, config)
    report.meta["notes"] += observations(report.runs)
    again = [r for r in report.runs if r.attempts > 1]
    if again:
        report.meta["notes"].append(
            f"{len(again)} runs were measured again because other work on the machine took more than "
            f"{args.busy_cores:g} cores during the first attempt; the least disturbed attempt is shown."
        )
    busy = [r for r in report.runs if r.other_cpu_cores > args.busy_cores]
    if busy:
        report.meta["notes"].append(
            f"{len(busy)} of {len(report.runs)} runs saw more than {args.busy_cores:g} cores of other work "
            "on the machine even at their best attempt "
            f"(up to {max(r.other_cpu_cores for r in busy):.2f}): their numbers are lower than on an idle "
            "machine."
        )
    publish(report, results_file, args)
    return 1 if failed else 0


def publish(report: Report, results_file: Path, args: argparse.Namespace) -> None:
    """Write the results JSON, the chart next to it and (``--docs``) the page; print the Markdown."""
    table = markdown(report)
    results_file.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    chart_path = None
    if not args.no_chart and report.runs:
        chart_path = results_file.with_suffix(".png")
        chart(report, chart_path)
    if args.docs is not None:
        docs(report, table, chart_path, args.docs)
    print(table)
    print(
        f"bench: wrote {results_file}"
        + (f", {chart_path}" if chart_path else "")
        + (f", {args.docs}" if args.docs else "")
    )


def republish(path: Path, args: argparse.Namespace) -> int:
    """``--from-results``: the report of an earlier run again, ratios and targets recomputed from the
    current thresholds, ``--note`` lines added; nothing is measured."""
    data = json.loads(path.read_text())
    fields = {f for f in Run.__dataclass_fields__}
    runs = [Run(**{k: v for k, v in run.items() if k in fields}) for run in data["runs"]]
    report = Report(meta=data["meta"], runs=runs)
    report.meta["notes"] = [*report.meta.get("notes", []), *args.note]
    report.ratios = ratios(report.runs)
    report.targets = targets(report.runs, load_config())
    publish(report, path, args)
    return 0


def _server_rank(run: Run) -> int:
    return ["ferry", "in-process", "mlflow", "floor"].index(run.server)


def quietest(measure_once: Callable[[], Run], args: argparse.Namespace) -> Run:
    """Measure; while other work on the machine took more than ``--busy-cores`` during the run, measure
    again (at most ``--busy-retries`` times) and keep the run that saw the least other work."""
    runs = [measure_once()]
    while runs[-1].other_cpu_cores > args.busy_cores and len(runs) <= args.busy_retries:
        print(
            f"bench:   busy machine ({runs[-1].other_cpu_cores:.2f} cores of other work): again", flush=True
        )
        runs.append(measure_once())
    best = min(runs, key=lambda r: r.other_cpu_cores)
    best.attempts = len(runs)
    return best


def _failed_run(s: Scenario, instance: Instance, exc: BaseException) -> Run:
    """The result row of a scenario that could not be measured."""
    return Run(
        s.id, s.title, instance.server, instance.variant, s.connections, s.rows, failure=str(exc)[:2000]
    )


def run_instance(
    instance: Instance,
    todo: list[Scenario],
    args: argparse.Namespace,
    redis: str | None,
    workdir: Path,
    report: Report,
) -> bool:
    """Start one server, run its scenarios, stop it. False when something could not be run."""
    bodies = {(s.model, s.rows): rows_json(s.model, s.rows) for s in todo}
    try:
        # Only the models these scenarios use: a subset starts faster, and a model that cannot load
        # here (ONNX on CUDA without onnxruntime-gpu) does not hold back the others.
        models = tuple(m for m in instance.models if any(s.model == m for s in todo))
        server = start(instance, args.tracking_uri, redis, args.logs or workdir / "logs", models)
    except Exception as exc:
        for s in todo:
            report.runs.append(_failed_run(s, instance, exc))
        print(f"bench: {instance.key} did not start: {exc}", file=sys.stderr, flush=True)
        return False
    ok = True
    with procs.running(server):
        for s in todo:
            body, headers = body_for(instance.server, s, bodies[(s.model, s.rows)])
            print(f"bench: {s.id} on {instance.key} ({len(body) / 1024:.0f} KB body)", flush=True)
            try:
                once = functools.partial(measure, server, s, instance, body, headers, workdir, args)
                run = quietest(once, args)
            except Exception as exc:
                ok = False
                run = _failed_run(s, instance, exc)
                print(
                    f"bench: {s.id} on {instance.key} failed: {exc}\n{server.log(2000)}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"bench:   {run.requests_per_s:,.0f} req/s, p50 {run.p50_ms:.2f} ms, "
                    f"p99 {run.p99_ms:.2f} ms, errors {run.errors}, "
                    f"server CPU {run.server_cpu_us_per_request:.0f} µs/req, "
                    f"wrk CPU {run.generator_cpu_pct:.0f}%, other {run.other_cpu_cores:.2f} cores",
                    flush=True,
                )
            report.runs.append(run)
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
