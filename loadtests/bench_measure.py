"""How the benchmark measures: start each server (and a Redis), check it answers, drive it with wrk and
collect throughput, latency and CPU numbers into ``Run`` rows; the in-process ceilings (ONNX Runtime and
torch called directly); the machine and tool versions the numbers were taken on."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
from bench_scenarios import (
    ALIAS,
    CNN,
    FEATURES,
    GRPC_INFER,
    IMAGE,
    ONNX,
    UNIQUE,
    Instance,
    Scenario,
    body_for,
    path_for,
    rows_json,
)

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk" / "post.lua"
KEEP_ENV = ("FERRY_DEVICE", "FERRY_REDIS_URL")
"""Ferry settings taken from the caller's environment; every other ``FERRY_*`` is the benchmark's."""


# ---------------------------------------------------------------------------------------------------- results
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


# -------------------------------------------------------------------------------------------------------- wrk
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
    if scenario.generator == "python":
        return measure_python(server, scenario, run, url, body, headers, args)
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
    return _fill(run, scenario, summary, server_cpu, wrk_cpu, busy)


def _fill(
    run: Run,
    scenario: Scenario,
    summary: dict[str, Any],
    server_cpu: float,
    generator_cpu: float,
    busy: float,
) -> Run:
    """``run`` with the numbers of one load (a wrk summary, or ``run_python_load``'s in the same form)."""
    wrk_cpu = generator_cpu
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


def measure_python(
    server: procs.Server,
    scenario: Scenario,
    run: Run,
    url: str,
    body: bytes,
    headers: dict[str, str],
    args: argparse.Namespace,
) -> Run:
    """``measure`` with ``run_python_load`` as the generator: gRPC to the server's gRPC port, REST to
    ``url``."""
    over_grpc = scenario.protocol == "grpc"
    target = str(getattr(server, "grpc_target", "")) if over_grpc else url
    if not target:
        raise RuntimeError(f"{server.name} serves no gRPC (FERRY_GRPC_PORT)")
    load = (target, over_grpc, body, headers, scenario.connections)
    check_once(*load)
    if args.warmup > 0:
        run_python_load(*load, args.warmup)
        time.sleep(SETTLE_S)
    cpu_before, busy_before = server.cpu_seconds(), _busy_cpu_seconds()
    summary, generator_cpu = run_python_load(*load, args.duration)
    server_cpu = server.cpu_seconds() - cpu_before
    return _fill(run, scenario, summary, server_cpu, generator_cpu, _busy_cpu_seconds() - busy_before)


def run_python_load(
    target: str, over_grpc: bool, body: bytes, headers: dict[str, str], connections: int, duration_s: float
) -> tuple[dict[str, Any], float]:
    """``connections`` concurrent callers for ``duration_s``, each sending ``body`` and waiting for the
    answer, over gRPC (``target`` host:port, ``ModelInfer``, one HTTP/2 channel) or HTTP/1.1 keep-alive
    (``target`` a URL, aiohttp): a summary in wrk's form and the generator's CPU time (seconds)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    summary = asyncio.run(_drive(target, over_grpc, body, headers, connections, duration_s))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return summary, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class _Refused(Exception):
    """An answer that is not a success (HTTP status other than 200, a gRPC status other than OK)."""


async def _drive(
    target: str, over_grpc: bool, body: bytes, headers: dict[str, str], connections: int, duration_s: float
) -> dict[str, Any]:
    import numpy as np

    send, close = await _sender(target, over_grpc, headers, connections)
    latencies: list[float] = []
    errors = {"status": 0, "other": 0}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s

    async def caller() -> None:
        while loop.time() < deadline:
            started = time.perf_counter()
            try:
                await send(body)
            except _Refused:
                errors["status"] += 1
                continue
            except Exception:
                errors["other"] += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(caller() for _ in range(connections)))
    finally:
        await close()
    elapsed = time.perf_counter() - began
    us = np.asarray(latencies or [0.0]) * 1e6
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        "latency_us": {q: float(np.percentile(us, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": float(us.max())},
        "errors": errors,
    }


async def _sender(
    target: str, over_grpc: bool, headers: dict[str, str], connections: int
) -> tuple[Callable[[bytes], Any], Callable[[], Any]]:
    """``(send(body), close())`` of one client: ``send`` raises ``_Refused`` on a refusal."""
    if over_grpc:
        import grpc.aio

        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        channel = grpc.aio.insecure_channel(target, options=options)
        infer = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out: the body is serialized already

        async def send_grpc(body: bytes) -> None:
            try:
                await infer(body, timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise _Refused(str(exc.code())) from exc

        return send_grpc, channel.close
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=10)
    )

    async def send_http(body: bytes) -> None:
        async with session.post(target, data=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise _Refused(str(response.status))

    return send_http, session.close


def check_once(target: str, over_grpc: bool, body: bytes, headers: dict[str, str], connections: int) -> None:
    """One request before the load: it must be answered, with outputs."""

    async def one() -> bytes:
        if over_grpc:
            import grpc.aio

            async with grpc.aio.insecure_channel(target) as channel:
                answer: bytes = await channel.unary_unary(GRPC_INFER)(body, timeout=60)
                return answer
        import aiohttp

        async with aiohttp.ClientSession() as session, session.post(target, data=body, headers=headers) as r:
            content = await r.read()
            if r.status != 200:
                raise RuntimeError(f"check request to {target} answered {r.status}: {content[:300]!r}")
            return content

    answer = asyncio.run(one())
    if over_grpc:
        from service.grpc import messages

        if not messages.ModelInferResponse.FromString(answer).outputs:
            raise RuntimeError(f"check request to {target} has no outputs")
    elif b'"outputs"' not in answer:
        raise RuntimeError(f"check request to {target} has no outputs: {answer[:300]!r}")


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


# ---------------------------------------------------------------------------------------------------- servers
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
        env |= dict(instance.env) | {"FERRY_WORKERS": str(instance.workers)}
        if instance.key == "ferry-redis":
            if redis is None:
                raise RuntimeError("no Redis: set FERRY_REDIS_URL or install redis-server")
            env["FERRY_REDIS_URL"] = redis
        else:
            env.pop("FERRY_REDIS_URL", None)
        grpc_port = procs.free_port() if instance.key == "ferry-grpc" else None
        if grpc_port is not None:
            env["FERRY_GRPC_PORT"] = str(grpc_port)
        argv = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = procs.start_server(instance.key, argv, port, "/health/ready", logs, env, timeout_s=300)
        if grpc_port is not None:
            server.grpc_target = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
        return server
    if instance.server == "mlflow":
        mlflow = str(Path(sys.executable).parent / "mlflow")
        argv = [mlflow, "models", "serve", "-m", f"models:/{instance.models[0]}@{ALIAS}"]
        argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(instance.workers)]
        return procs.start_server(
            instance.key.replace(":", "-"), argv, port, "/ping", logs, env, timeout_s=300
        )
    argv = [sys.executable, str(HERE / "floor.py"), "--port", str(port), "--workers", str(instance.workers)]
    return procs.start_server("floor", argv, port, "/health/ready", logs, env, timeout_s=60)


# ----------------------------------------------------------------------------------------- in-process ceiling
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


# ------------------------------------------------------------------------------------------------ the machine
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


# ------------------------------------------------------------------------------------- one server's scenarios
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
    runs: list[Run],
) -> bool:
    """Start one server, run its scenarios (their rows appended to ``runs``), stop it. False when
    something could not be run."""
    bodies = {(s.model, s.rows): rows_json(s.model, s.rows) for s in todo}
    try:
        # Only the models these scenarios use: a subset starts faster, and a model that cannot load
        # here (ONNX on CUDA without onnxruntime-gpu) does not hold back the others.
        models = tuple(m for m in instance.models if any(s.model == m for s in todo))
        server = start(instance, args.tracking_uri, redis, args.logs or workdir / "logs", models)
    except Exception as exc:
        for s in todo:
            runs.append(_failed_run(s, instance, exc))
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
                    f"generator CPU {run.generator_cpu_pct:.0f}%, other {run.other_cpu_cores:.2f} cores",
                    flush=True,
                )
            runs.append(run)
    return ok
