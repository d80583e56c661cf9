"""A gated Locust run against Ferry: the same users first against the HTTP floor (``floor.py``), then
against Ferry, with the thresholds of one ``[gate.*]`` profile of ``thresholds.toml``.

    make loadtest                                   # Ferry on the demo models, 45 s, CSV + HTML reports
    .venv/bin/python loadtests/loadtest.py --profile smoke --duration 12 --floor-duration 6
    .venv/bin/python loadtests/loadtest.py --url http://127.0.0.1:8000 --server-pid 1234   # a running Ferry

Without ``--url`` it starts Ferry itself (``FERRY_MODELS`` or the demo models, from the registry of
``MLFLOW_TRACKING_URI``). Locust runs as a subprocess (it monkey-patches the process with gevent). The
exit status is Locust's: 0 when every bound of the profile holds. Reports go to ``--reports``:
``floor.json`` and ``ferry.json`` (the gate's), ``ferry_stats.csv`` and friends, ``ferry.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procs  # noqa: E402

DEMO_MODELS = (
    "tabular-mlp-onnx=models:/tabular-mlp-onnx@champion,tabular-mlp=models:/tabular-mlp@champion,"
    "image-cnn=models:/image-cnn@champion"
)
"""The load-tested model comes first: ``/invocations`` answers with the default (first) model."""


def locust(
    url: str,
    profile: str,
    users: int,
    duration_s: float,
    reports: Path,
    stem: str,
    server_pid: int,
    floor_report: Path | None = None,
    html: bool = False,
) -> int:
    argv = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary"]
    argv += ["--host", url, "-u", str(users), "-r", str(users), "-t", f"{max(1, round(duration_s))}s"]
    argv += [
        "--csv",
        str(reports / stem),
        "--gate-profile",
        profile,
        "--gate-report",
        str(reports / f"{stem}.json"),
    ]
    argv += ["--gate-server-pid", str(server_pid), "--loglevel", "INFO"]
    if floor_report is not None:
        argv += ["--gate-floor-report", str(floor_report)]
    if html:
        argv += ["--html", str(reports / f"{stem}.html")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    print(f"loadtest: {profile}: {users} users for {duration_s:g} s against {url}", flush=True)
    timeout_s = duration_s + 120
    try:
        return subprocess.run(argv, env=env, cwd=procs.ROOT, timeout=timeout_s, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"loadtest: locust did not finish within {timeout_s:.0f} s", file=sys.stderr)
        return 124


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Gated Locust run against Ferry, after the same on the floor."
    )
    parser.add_argument("--profile", default="full", help="[gate.NAME] of thresholds.toml (default full)")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load on Ferry (default 45)")
    parser.add_argument("--floor-duration", type=float, default=15.0, help="seconds on the floor; 0 skips it")
    parser.add_argument("--users", type=int, default=32, help="concurrent Locust users (default 32)")
    parser.add_argument("--url", default="", help="a running Ferry (default: start one)")
    parser.add_argument(
        "--server-pid", type=int, default=0, help="the running Ferry's pid, for CPU per request"
    )
    parser.add_argument("--reports", type=Path, default=HERE / "reports", help="report folder")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    logs = args.reports / "logs"

    floor_report: Path | None = None
    if args.floor_duration > 0:
        port = procs.free_port()
        floor = procs.start_server(
            "floor",
            [sys.executable, str(HERE / "floor.py"), "--port", str(port)],
            port,
            "/health/ready",
            logs,
        )
        with procs.running(floor):
            locust(
                floor.url, "floor", args.users, args.floor_duration, args.reports, "floor", floor.process.pid
            )
        floor_report = args.reports / "floor.json"
        if not floor_report.exists():
            print("loadtest: the floor run wrote no report", file=sys.stderr)
            return 1

    run = (args.profile, args.users, args.duration, args.reports, "ferry")
    if args.url:
        code = locust(args.url, *run, args.server_pid, floor_report, html=True)
    else:
        port = procs.free_port()
        env = procs.venv_env()
        env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///.ferry/mlflow.db")
        env["FERRY_MODELS"] = os.environ.get("FERRY_MODELS") or DEMO_MODELS
        argv_ferry = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
        ferry = procs.start_server("ferry", argv_ferry, port, "/health/ready", logs, env, timeout_s=300)
        with procs.running(ferry):
            code = locust(ferry.url, *run, ferry.process.pid, floor_report, html=True)
    report = args.reports / "ferry.json"
    if report.exists():
        data = json.loads(report.read_text())
        failed = [c for c in data["checks"] if c["ok"] is False]
        print(f"loadtest: gate {data['profile']} {'passed' if data['passed'] else 'FAILED'}; report {report}")
        for c in failed:
            print(f"loadtest:   {c['name']}: {c['value']} (bound {c['bound']})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
