"""The Locust gate: at the end of a run, check its numbers against ``thresholds.toml`` and set Locust's
exit code (0: every bound holds, 1: a bound is broken), writing a JSON report of what was checked.

``locustfile.py`` imports this module, which adds Locust options:

- ``--gate-profile NAME``: the ``[gate.NAME]`` table of thresholds to apply (``smoke``, ``full``;
  ``floor`` checks nothing and only measures); without it Locust runs ungated;
- ``--gate-server-pid PID``: the server's process, whose CPU time (``/proc/PID/stat``, with its
  descendants') is divided by the requests to give CPU per request;
- ``--gate-floor-report FILE``: the report of the same users' run against ``loadtests/floor.py``: the
  denominator of the ratio bounds (CPU per request, requests/s and p95 relative to the floor);
- ``--gate-report FILE``: where to write this run's report (JSON).

"Valid" requests are all requests whose name does not start with ``invalid``; invalid ones count as
4xx (or not) by their status. Ratios to the floor carry over between machines and survive a busy one;
absolute bounds only catch hangs.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import procs
from locust import events
from locust.env import Environment
from locust.stats import StatsEntry

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"
INVALID_PREFIX = "invalid"
log = logging.getLogger("ferry.gate")


class _Run:
    """What the listeners gather during one run."""

    def __init__(self) -> None:
        self.started = self.stopped = 0.0
        self.cpu_start = self.cpu_stop = 0.0
        self.invalid_total = 0
        self.invalid_4xx = 0
        self.invalid_status: dict[str, int] = {}


_run = _Run()


def _options(parser: Any) -> None:
    group = parser.add_argument_group("Ferry gate")
    group.add_argument(
        "--gate-profile", default="", help="[gate.NAME] thresholds to apply (smoke, full, floor)"
    )
    group.add_argument("--gate-thresholds", default=str(THRESHOLDS), help="thresholds file (TOML)")
    group.add_argument("--gate-server-pid", type=int, default=0, help="server process for CPU per request")
    group.add_argument("--gate-floor-report", default="", help="the floor run's gate report (JSON)")
    group.add_argument("--gate-report", default="", help="write this run's gate report here (JSON)")


def _start(environment: Environment, **_: Any) -> None:
    _run.started = time.monotonic()
    pid = environment.parsed_options.gate_server_pid if environment.parsed_options else 0
    _run.cpu_start = procs.tree_cpu_seconds(pid) if pid else 0.0


def _stop(environment: Environment, **_: Any) -> None:
    _run.stopped = time.monotonic()
    pid = environment.parsed_options.gate_server_pid if environment.parsed_options else 0
    _run.cpu_stop = procs.tree_cpu_seconds(pid) if pid else 0.0


def _request(name: str, response: Any = None, **_: Any) -> None:
    if not name.startswith(INVALID_PREFIX):
        return
    status = int(getattr(response, "status_code", 0) or 0)
    _run.invalid_total += 1
    _run.invalid_4xx += 400 <= status < 500
    _run.invalid_status[str(status)] = _run.invalid_status.get(str(status), 0) + 1


def _quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.gate_profile:
        return
    report = summarize(environment)
    profile = options.gate_profile
    with open(options.gate_thresholds, "rb") as f:
        bounds: dict[str, float] = tomllib.load(f).get("gate", {}).get(profile, {})
    floor = json.loads(Path(options.gate_floor_report).read_text()) if options.gate_floor_report else None
    report["profile"] = profile
    report["checks"] = [] if profile == "floor" else evaluate(report, bounds, floor)
    report["passed"] = all(c["ok"] is not False for c in report["checks"])
    if options.gate_report:
        Path(options.gate_report).write_text(json.dumps(report, indent=2) + "\n")
    for check in report["checks"]:
        verdict = {True: "ok  ", False: "FAIL", None: "skip"}[check["ok"]]
        log.info("gate %s %s: %s (bound %s)", verdict, check["name"], check["value"], check["bound"])
    log.info(
        "gate %s: %s, %d valid requests at %.0f/s, p95 %.1f ms, p99 %.1f ms, %.0f µs server CPU per request",
        profile,
        "passed" if report["passed"] else "FAILED",
        report["valid_requests"],
        report["valid_rps"],
        report["p95_ms"],
        report["p99_ms"],
        report["server_cpu_us_per_request"] or 0.0,
    )
    environment.process_exit_code = 0 if report["passed"] else 1


def summarize(environment: Environment) -> dict[str, Any]:
    """The run's numbers: valid requests aggregated over every endpoint, the invalid ones by status."""
    stats = environment.stats
    valid = StatsEntry(stats, "valid", "", use_response_times_cache=False)
    endpoints = {}
    for (name, method), entry in stats.entries.items():
        endpoints[f"{method} {name}"] = {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
        if not name.startswith(INVALID_PREFIX):
            valid.extend(entry)
    duration = max((_run.stopped or time.monotonic()) - _run.started, 1e-9)
    total = stats.total.num_requests
    pid = environment.parsed_options.gate_server_pid if environment.parsed_options else 0
    cpu = _run.cpu_stop - _run.cpu_start if pid else None
    if cpu is not None and cpu <= 0:
        log.warning("no CPU time measured for pid %s: is it the server?", pid)
        cpu = None
    return {
        "duration_s": round(duration, 2),
        "requests": total,
        "valid_requests": valid.num_requests,
        "valid_failures": valid.num_failures,
        "failure_ratio": valid.num_failures / valid.num_requests if valid.num_requests else 1.0,
        "valid_rps": round(valid.num_requests / duration, 1),
        "rps": round(total / duration, 1),
        "p50_ms": valid.get_response_time_percentile(0.5) if valid.num_requests else 0.0,
        "p95_ms": valid.get_response_time_percentile(0.95) if valid.num_requests else 0.0,
        "p99_ms": valid.get_response_time_percentile(0.99) if valid.num_requests else 0.0,
        "invalid_requests": _run.invalid_total,
        "invalid_4xx": _run.invalid_4xx,
        "invalid_status": _run.invalid_status,
        "server_cpu_s": round(cpu, 3) if cpu is not None else None,
        "server_cpu_us_per_request": round(1e6 * cpu / total, 1) if cpu is not None and total else None,
        "endpoints": endpoints,
    }


def evaluate(
    report: dict[str, Any], bounds: dict[str, float], floor: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One check per bound of the profile; ``ok`` is None when a check cannot be made (no floor report,
    no server pid)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, bound: float, at_most: bool) -> None:
        ok = None if value is None else (value <= bound if at_most else value >= bound)
        checks.append(
            {"name": name, "value": None if value is None else round(value, 4), "bound": bound, "ok": ok}
        )

    def ratio(key: str) -> float | None:
        if floor is None or not floor.get(key) or report.get(key) is None:
            return None
        return float(report[key]) / float(floor[key])

    share = report["invalid_4xx"] / report["invalid_requests"] if report["invalid_requests"] else None
    known = {
        "max_failure_ratio": (report["failure_ratio"], True),
        "min_invalid_4xx_share": (share, False),
        "min_requests": (report["valid_requests"], False),
        "max_p95_ms": (report["p95_ms"], True),
        "max_p99_ms": (report["p99_ms"], True),
        "max_cpu_per_request_vs_floor": (ratio("server_cpu_us_per_request"), True),
        "min_rps_vs_floor": (ratio("rps"), False),
        "max_p95_vs_floor": (ratio("p95_ms"), True),
    }
    for name, bound in bounds.items():
        if name not in known:
            raise ValueError(f"unknown gate threshold {name!r}; known: {sorted(known)}")
        value, at_most = known[name]
        check(name, value, bound, at_most)
    return checks


# Registered when locustfile.py imports this module.
events.init_command_line_parser.add_listener(_options)
events.test_start.add_listener(_start)
events.test_stop.add_listener(_stop)
events.request.add_listener(_request)
events.quitting.add_listener(_quitting)
