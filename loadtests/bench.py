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
  ``FERRY_REDIS_URL`` names one);
- the transports side by side (issue 16): 64-row ``tabular-mlp-onnx`` and one ``image-cnn`` image over
  gRPC (raw contents), REST v2 binary and REST v2 JSON, one Ferry with ``FERRY_GRPC_PORT``, 16
  connections, all three driven by the same Python generator (asyncio with grpc.aio or aiohttp: wrk has
  no gRPC), so their ratios compare the transports, not the generators.

Writes ``bench/results/<date>-<host>.json`` and ``.png``, prints the Markdown report, and with
``--docs`` regenerates ``docs/benchmarks.md``. Targets come from ``loadtests/thresholds.toml``
(``[targets]``); they are reported as met or missed, never asserted. The exit status is 1 only when a
scenario could not be run (a server did not start, or answered a check request wrongly).

This file reads the command line and wires the parts, one module per job: ``bench_scenarios.py`` (what is
measured: servers, scenarios, bodies), ``bench_measure.py`` (starting servers, wrk, the in-process
ceilings, the numbers), ``bench_report.py`` (ratios, targets, notes; the JSON, Markdown, chart and docs
page).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procs  # noqa: E402
from bench_measure import (  # noqa: E402
    Run,
    machine,
    onnx_ceiling,
    quietest,
    redis_url,
    run_instance,
    torch_inprocess,
    versions,
)
from bench_report import Report, load_config, observations, publish, ratios, targets  # noqa: E402
from bench_scenarios import CNN, INSTANCES, ONNX, ORDER, scenarios  # noqa: E402

ROOT = procs.ROOT
DEFAULT_TRACKING_URI = "sqlite:///.ferry/mlflow.db"


# ------------------------------------------------------------------------------------------------------- main
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
            "generator": "wrk -t1 --timeout 10s -s loadtests/wrk/post.lua; the transport scenarios "
            "(-grpc, -v2bin, -v2json): bench_measure.run_python_load (asyncio, grpc.aio / aiohttp)",
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
        if any(s.rows == 256 and s.model == ONNX for s in chosen) and "ferry" in servers:
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
                failed |= not run_instance(instance, todo, args, redis, workdir, report.runs)
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


if __name__ == "__main__":
    raise SystemExit(main())
