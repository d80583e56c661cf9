"""``FERRY_WORKERS=2``: a real supervisor and two real worker processes on one port (service/workers.py).

What clients see, as asserted here:
- both workers answer on the one port (the probes name the answering worker's pid, ``X-Ferry-Worker``);
- ``/metrics`` from either worker adds up the requests both answered;
- a worker killed with SIGKILL under load: only requests on its connections fail, with a transport error
  (the connection drops; never an HTTP error status), at most one per connection; the others all succeed,
  the supervisor restarts it (counted, logged) and every request after that succeeds;
- SIGTERM under load: every accepted request succeeds, the supervisor exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from procs import ROOT, free_port, launch, stop_server, wait_ready
from prometheus_client import multiprocess

from conftest import Registry, metric, start_server, wait_until

pytestmark = pytest.mark.integration

MODEL = "linear=models:/linear@champion"
TWO = {"FERRY_WORKERS": "2", "FERRY_RELOAD__POLL_S": "0"}


def _worker_pids(supervisor: int) -> set[int]:
    """The live children of the supervisor (its workers)."""
    pids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == supervisor:
                pids.add(int(entry.name))
    return pids


def _pinned_clients(url: str, per_worker: int, timeout_s: float = 120.0) -> dict[int, list[httpx.Client]]:
    """Kept-alive clients, ``per_worker`` on each of the 2 workers: a connection stays on the worker that
    accepted it, and its ``/health/live`` names that worker (worker 1 joins once its models are loaded)."""
    clients: dict[int, list[httpx.Client]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        pid = int(client.get("/health/live").headers["x-ferry-worker"])
        if len(clients.setdefault(pid, [])) < per_worker:
            clients[pid].append(client)
        else:
            client.close()
            time.sleep(0.01)
        if len(clients) >= 2 and all(len(c) >= per_worker for c in clients.values()):
            return clients
    raise AssertionError(f"connections reached {len(clients)} worker(s) in {timeout_s} s: {clients.keys()}")


def _predict(client: httpx.Client, i: int) -> int:
    r = client.post("/predict", json={"model": "linear", "inputs": [[i, 0, 0, 0]]})
    assert r.status_code != 200 or r.json()["outputs"] == [[2 * i + 1.0] * 3]
    return r.status_code


def test_two_workers_answer_on_one_port_and_metrics_add_up(registry: Registry, tmp_path: Path) -> None:
    server = start_server(registry, MODEL, tmp_path, TWO)
    try:
        workers = _worker_pids(server.process.pid)
        assert len(workers) == 2, server.log()
        clients = _pinned_clients(server.url, per_worker=1)
        assert set(clients) == workers  # the pids answering on the port are the supervisor's two children
        sent: Counter[int] = Counter()
        for n, (pid, (client,)) in enumerate(clients.items()):
            for i in range(7 + 5 * n):  # a different count per worker: the sum cannot come from one
                assert _predict(client, i) == 200
                sent[pid] += 1
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "ferry_inference_requests_total", model="linear") == sum(sent.values())
        assert metric(text, "http_requests_total", handler="/predict", status="200") == sum(sent.values())
        assert metric(text, "ferry_inference_duration_seconds_count", model="linear", stage="total") == sum(
            sent.values()
        )
        assert metric(text, "ferry_model_ready", model="linear") == 1.0  # livemin: one series, not per pid
        assert 'pid="' not in text  # every gauge has a mode across workers: no per-worker series
        assert metric(text, "ferry_build_info") == 1.0  # collected once, not once per worker
        assert metric(text, "ferry_worker_restarts_total") == 0.0
        for group in clients.values():
            for client in group:
                client.close()
    finally:
        assert stop_server(server) == 0


def test_sigkill_of_a_worker_under_load(registry: Registry, tmp_path: Path) -> None:
    server = start_server(registry, MODEL, tmp_path, TWO)
    clients = _pinned_clients(server.url, per_worker=2)
    victim, survivor = sorted(clients)
    stop = threading.Event()
    # per client: HTTP statuses, and transport errors while the client was still on its first worker
    statuses: dict[int, list[int]] = {id(c): [] for group in clients.values() for c in group}
    errors: dict[int, list[str]] = {id(c): [] for group in clients.values() for c in group}
    later_errors: list[str] = []

    def load(client: httpx.Client, i: int) -> None:
        moved = False
        while not stop.is_set():
            try:
                statuses[id(client)].append(_predict(client, i))
            except httpx.TransportError as exc:
                (later_errors if moved else errors[id(client)]).append(type(exc).__name__)
                moved = True  # the next request opens a new connection: any live worker may take it
                time.sleep(0.05)

    threads = [
        threading.Thread(target=load, args=(c, i))
        for i, c in enumerate(c for g in clients.values() for c in g)
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(s) >= 3 for s in statuses.values()), timeout_s=60, interval_s=0.05)
        os.kill(victim, signal.SIGKILL)
        others: set[int] = set()

        def replaced() -> bool:  # one scan: two could see the killed worker before and after its reaping
            others.clear()
            others.update(_worker_pids(server.process.pid) - {survivor})
            return len(others) == 1 and victim not in others

        assert wait_until(replaced, timeout_s=30, interval_s=0.1), server.log()
        restarted = others.pop()

        def restart_counted() -> bool:
            return metric(httpx.get(f"{server.url}/metrics").text, "ferry_worker_restarts_total") == 1.0

        assert wait_until(restart_counted, timeout_s=60, interval_s=0.2)
        # the restarted worker accepts once its model is loaded: it answers the probes then
        seen: set[int] = set()
        assert wait_until(
            lambda: seen.add(int(httpx.get(f"{server.url}/health/live").headers["x-ferry-worker"])) or (
                restarted in seen
            ), timeout_s=120, interval_s=0.05,
        ), server.log()  # fmt: skip
        after = sum(map(len, statuses.values()))
        wait_until(lambda: sum(map(len, statuses.values())) >= after + 20, timeout_s=30, interval_s=0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    on_victim = {id(c) for c in clients[victim]}
    for key, failed in errors.items():
        if key not in on_victim:
            assert failed == [], f"a client on the surviving worker failed: {failed}"
        assert len(failed) <= 1  # the request in flight when its worker died; the next one reconnects
    assert later_errors == [], f"requests failed after reconnecting: {later_errors}"
    every = [s for s in statuses.values() for s in s]
    assert set(every) == {200}, Counter(every)  # an HTTP answer is always a success: no 5xx, no 503
    assert sum(map(len, statuses.values())) > after  # requests kept succeeding after the restart
    assert re.search(rf"worker \d \(pid {victim}\) died \(signal SIGKILL\)", server.log())
    assert stop_server(server) == 0


def test_sigterm_with_two_workers_drains_every_accepted_request(registry: Registry, tmp_path: Path) -> None:
    """Every request sent before the signal, and every request either worker read after it, is answered
    200. After the signal each answer says ``Connection: close``, so every later request opens a new
    connection; once both workers have closed the port such a connection is refused (ConnectError), or
    reset when it was queued in the listening socket at the instant the last worker closed it (never
    read: as with one process). A kept-alive connection is never closed under a request."""
    server = start_server(registry, MODEL, tmp_path, TWO | {"FERRY_SHUTDOWN__GRACE_S": "2"})
    clients = _pinned_clients(server.url, per_worker=3)
    stop, signalled = threading.Event(), threading.Event()
    statuses: list[int] = []
    closing = 0  # answers after the signal that closed their connection
    failed: list[str] = []  # transport errors other than a refused connection, and when

    def load(client: httpx.Client, i: int) -> None:
        nonlocal closing
        while not stop.is_set():
            after = signalled.is_set()
            try:
                r = client.post("/predict", json={"model": "linear", "inputs": [[i, 0, 0, 0]]})
            except httpx.ConnectError:  # after the grace period: not accepted, not failed
                time.sleep(0.05)
                continue
            except httpx.TransportError as exc:
                failed.append(f"{'after' if after else 'before'} the signal: {exc!r}")
                time.sleep(0.05)
                continue
            statuses.append(r.status_code)
            assert r.status_code != 200 or r.json()["outputs"] == [[2 * i + 1.0] * 3]
            closing += after and r.headers.get("connection") == "close"

    threads = [
        threading.Thread(target=load, args=(c, i))
        for i, c in enumerate(c for g in clients.values() for c in g)
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= 12, timeout_s=30, interval_s=0.05)
        server.process.send_signal(signal.SIGTERM)  # the supervisor alone, as Kubernetes signals PID 1
        signalled.set()
        time.sleep(0.3)
        ready = httpx.get(f"{server.url}/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
        during = len(statuses)
        assert wait_until(lambda: len(statuses) > during + 5, timeout_s=1.5, interval_s=0.05), (
            "requests stopped being served during the grace period"
        )
        assert server.process.wait(timeout=60) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if server.process.poll() is None:
            server.process.kill()
    assert statuses and set(statuses) == {200}, Counter(statuses)
    assert closing > 0  # (those sent before the workers got the signal may still keep their connection)
    assert [f for f in failed if f.startswith("before")] == [], failed
    assert all("ReadError" in f or "RemoteProtocolError" in f for f in failed), failed
    assert server.log().count("readiness is now 503") == 2  # each worker ran its grace period
    assert "worker 0 (pid" in server.log() and "stopped: exit status 0" in server.log()


def test_port_zero_any_address_and_bad_values(registry: Registry, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= registry.env() | {
        "FERRY_MODELS": MODEL,
        "FERRY_DOWNLOAD_DIR": str(tmp_path / "downloads"),
        "FERRY_ALLOWED_FLAVORS": "onnx,pytorch",
        "FERRY_SHUTDOWN__GRACE_S": "0",
        "PYTHONUNBUFFERED": "1",
    }
    metrics_port = free_port()
    argv = [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--port", "0", "--workers", "2"]
    server = launch(
        "ferry",
        argv,
        tmp_path / "ferry.log",
        env=env | {"FERRY_METRICS_PORT": str(metrics_port)},
        cwd=tmp_path,
    )
    try:
        assert wait_until(lambda: "with 2 workers" in server.log(), timeout_s=60, interval_s=0.1)
        found = re.search(r"serving on http://0\.0\.0\.0:(\d+) with 2 workers", server.log())
        assert found, server.log()
        port = int(found.group(1))
        assert port != 0
        wait_ready(server, "/health/ready", 120, url=f"http://127.0.0.1:{metrics_port}")
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"model": "linear", "inputs": [[1, 0, 0, 0]]})
        assert r.status_code == 200 and r.json()["outputs"] == [[3.0] * 3]
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text  # FERRY_METRICS_PORT, shared too
        assert metric(text, "ferry_inference_requests_total", model="linear") == 1.0
        assert "listening on 0.0.0.0" in server.log()  # the exposure warning still comes first
    finally:
        assert stop_server(server) == 0
    for bad in ("0", "-1", "many"):
        refused = launch("bad", [*argv, "--workers", bad], tmp_path / f"bad{bad}.log", env=env, cwd=tmp_path)
        assert refused.process.wait(timeout=60) == 2
        assert "FERRY_WORKERS: " in refused.log() and "integer >= 1 or auto" in refused.log(), refused.log()
        assert bad not in refused.log().split("FERRY_WORKERS: ", 1)[1], refused.log()  # values never quoted


_WORKER_METRICS = """
import os, sys
from service.metrics import Metrics
m = Metrics(process=False)
m.requests.labels("linear", "1", "ferry").inc(int(sys.argv[1]))
m.model_ready.labels("linear").set(1)
m.model_ready.labels("gone").set(1)
m.queue_rows.labels("linear", "1").set(int(sys.argv[1]))
m.model_info.labels("linear", sys.argv[2], "champion", "onnx", "onnxruntime", "cpu", "CPU").set(1)
if sys.argv[3] == "swap":  # this worker retired version 1 and stopped serving "gone"
    m.model_info.remove("linear", "1", "champion", "onnx", "onnxruntime", "cpu", "CPU")
    m.model_ready.remove("gone")
print(os.getpid())
"""


def test_metrics_of_worker_processes_merge(tmp_path: Path) -> None:
    """Two real processes writing to one PROMETHEUS_MULTIPROC_DIR, as two workers do, and the scrape a
    third one (the answering worker) renders: counters add up, gauges follow their mode, and a series
    one worker removed is gone from the view once no live worker has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER_METRICS)
    pids = [
        int(subprocess.run(
            [sys.executable, str(script), *args], env=env, check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout)
        for args in (("3", "1", "keep"), ("4", "2", "swap"))
    ]  # fmt: skip
    # The two writers have exited; as the supervisor does not mark them dead here, their live gauges stay.
    scrape = (
        "from service.metrics import Metrics; import sys; sys.stdout.write(Metrics().exposition().decode())"
    )
    text = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert metric(text, "ferry_inference_requests_total", model="linear") == 7.0  # 3 + 4
    assert metric(text, "ferry_queue_rows", model="linear") == 7.0  # livesum
    assert metric(text, "ferry_model_ready", model="linear") == 1.0  # livemin, one series
    assert metric(text, "ferry_model_ready", model="gone") == 1.0  # the other worker still serves it
    assert metric(text, "ferry_model_info", version="2") == 1.0
    assert metric(text, "ferry_model_info", version="1") == 1.0  # the first worker still serves v1
    assert 'pid="' not in text
    assert metric(text, "ferry_build_info") == 1.0  # from the scraping process alone
    assert metric(text, "ferry_worker_restarts_total") == 0.0
    # The first worker dies and is marked dead: its live gauges leave the view, its counts stay.
    multiprocess.mark_process_dead(pids[0], str(tmp_path))  # type: ignore[no-untyped-call]
    text = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert metric(text, "ferry_inference_requests_total", model="linear") == 7.0
    assert metric(text, "ferry_queue_rows", model="linear") == 4.0
    assert 'version="1"' not in text.split("ferry_model_info", 1)[1].split("# HELP", 1)[0]  # removed: NaN
    assert 'model="gone"' not in text  # removed by the one live worker that had it


def test_worker_count() -> None:
    """``auto`` is one worker per usable CPU core on CPU; a number is taken as it is; a bad value, or
    workers with gRPC on port 0, is refused naming the field."""
    from pydantic import ValidationError

    from service.config import Settings
    from service.workers import usable_cores, worker_count

    cores = usable_cores()  # its CPUs, fewer under a cgroup CPU limit (tests/unit/test_swaps.py)
    assert worker_count(Settings(workers="auto", device="cpu")) == (cores, ["cpu"] * cores)
    assert worker_count(Settings(workers=3, device="cpu")) == (3, ["cpu"] * 3)
    for bad in (0, "2.5", "all"):
        with pytest.raises(ValidationError, match="workers"):
            Settings(workers=bad)
    with pytest.raises(ValidationError, match="grpc_port 0"):  # each worker would get a port of its own
        Settings(workers=2, grpc_port=0)
    assert Settings(workers=2, grpc_port=8001).grpc_port == 8001  # shared (SO_REUSEPORT)


def test_grpc_with_two_workers_shares_its_port(registry: Registry, tmp_path: Path) -> None:
    """Both workers serve ``FERRY_GRPC_PORT`` (``SO_REUSEPORT``): every new gRPC connection is answered,
    the calls add up in one ``/metrics``, and with one worker killed new connections reach the other."""
    import numpy as np
    import tritonclient.grpc as triton

    port = free_port()
    env = TWO | {"FERRY_GRPC_PORT": str(port)}
    server = start_server(registry, "linear-onnx=models:/linear-onnx@champion", tmp_path, env)

    def infer(i: int) -> None:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")  # a new channel: a new connection
        try:
            tensor = triton.InferInput("input", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[i, 0, 0, 0]], dtype=np.float32))
            got = client.infer("linear-onnx", [tensor]).as_numpy("output")
            assert got.tolist() == [[2.0 * i + 1.0] * 3]
        finally:
            client.close()

    clients: dict[int, list[httpx.Client]] = {}
    try:
        clients = _pinned_clients(server.url, per_worker=1)  # both workers accept: both serve gRPC too
        for i in range(20):
            infer(i)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "ferry_grpc_requests_total", method="ModelInfer", code="OK") == 20
        assert len(re.findall(rf"gRPC \(Open Inference Protocol.*:{port}\n", server.log())) == 2, server.log()
        victim = min(clients)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in _worker_pids(server.process.pid), timeout_s=30)
        for i in range(20):  # the dead worker's socket left the port group: no connection is lost
            infer(i)
    finally:
        for group in clients.values():
            for client in group:
                client.close()
        assert stop_server(server) == 0
