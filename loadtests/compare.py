"""Compare a new benchmark result with a baseline (the last result on main) and fail on a regression.

    .venv/bin/python loadtests/compare.py BASELINE.json NEW.json
    .venv/bin/python loadtests/compare.py --baseline-dir baseline/ NEW.json   # newest other file there

Every Ferry run is first divided by the floor's run of the same scenario in the same file (requests/s
and p99), so that a faster, slower or busier machine cancels out; then the new ratio is compared with
the baseline's. The tolerances are ``[compare]`` of ``thresholds.toml``, all ratios new/baseline: each
scenario's throughput and p99, and the geometric mean of the throughput changes over all scenarios
(a change that slows every path shows there even when each scenario stays within its own bound).

Not compared, and listed: scenarios missing from either file, runs with fewer than ``min_requests``
requests, runs disturbed by other work on the machine (``other_cpu_cores`` above ``max_other_cores`` in
either file, Ferry's or the floor's run), and the scenarios named in ``skip``.
Exit status: 0 no regression, 1 regression, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"


@dataclass(frozen=True)
class Row:
    key: str
    metric: str
    baseline: float
    new: float
    change: float
    bound: float
    ok: bool


@dataclass(frozen=True)
class Point:
    """One Ferry run of a results file, relative to the floor's run of its scenario when there is one."""

    throughput: float
    p99: float
    absolute: bool
    """No floor run: absolute values, which only compare between runs on the same machine."""
    other_cores: float


def normalized(results: dict[str, Any], min_requests: int) -> dict[str, Point]:
    """``{"scenario / ferry label": Point}`` for the Ferry runs of one results file."""
    runs = [r for r in results["runs"] if not r.get("failure")]
    floors = {r["scenario"]: r for r in runs if r["server"] == "floor"}
    out: dict[str, Point] = {}
    for run in runs:
        if run["server"] != "ferry" or run["requests"] < min_requests:
            continue
        floor = floors.get(run["scenario"])
        key = f"{run['scenario']} / {run.get('label') or run['server']}"
        other = float(run.get("other_cpu_cores", 0.0))
        if floor and floor["requests_per_s"] and floor["p99_ms"]:
            other = max(other, float(floor.get("other_cpu_cores", 0.0)))
            out[key] = Point(
                run["requests_per_s"] / floor["requests_per_s"], run["p99_ms"] / floor["p99_ms"], False, other
            )
        else:
            out[key] = Point(run["requests_per_s"], run["p99_ms"], True, other)
    return out


def compare(
    baseline: dict[str, Any], new: dict[str, Any], config: dict[str, Any]
) -> tuple[list[Row], list[str]]:
    """Per-scenario rows, then one ``geometric mean`` row; and what was not compared, with why."""
    min_requests = int(config.get("min_requests", 0))
    max_other = float(config.get("max_other_cores", math.inf))
    skip = set(config.get("skip", []))
    base, now = normalized(baseline, min_requests), normalized(new, min_requests)
    skipped = [f"{k} (in one file only)" for k in sorted(base.keys() ^ now.keys())]
    rows: list[Row] = []
    for key in sorted(base.keys() & now.keys()):
        old, value = base[key], now[key]
        if key in skip:
            skipped.append(f"{key} (listed in skip)")
            continue
        if old.absolute != value.absolute:
            skipped.append(f"{key} (floor run in one file only)")
            continue
        if max(old.other_cores, value.other_cores) > max_other:
            skipped.append(
                f"{key} (disturbed: {max(old.other_cores, value.other_cores):.2f} cores of other work)"
            )
            continue
        for metric, bound, higher_is_better in (
            ("throughput", float(config["min_throughput_ratio"]), True),
            ("p99", float(config["max_p99_ratio"]), False),
        ):
            was, now_value = getattr(old, metric), getattr(value, metric)
            if was <= 0 or now_value <= 0:
                continue
            change = now_value / was
            ok = change >= bound if higher_is_better else change <= bound
            rows.append(Row(key, metric, was, now_value, change, bound, ok))
    changes = [r.change for r in rows if r.metric == "throughput"]
    if changes:
        mean = math.exp(sum(map(math.log, changes)) / len(changes))
        bound = float(config["min_geomean_throughput_ratio"])
        rows.append(
            Row(
                f"all {len(changes)} scenarios",
                "throughput, geometric mean",
                1.0,
                mean,
                mean,
                bound,
                mean >= bound,
            )
        )
    return rows, skipped


def newest(folder: Path, exclude: Path) -> Path | None:
    candidates = [p for p in folder.glob("*.json") if p.resolve() != exclude.resolve()]
    dated = []
    for path in candidates:
        try:
            dated.append((json.loads(path.read_text())["meta"]["date"], path))
        except (OSError, ValueError, KeyError):
            continue
    return max(dated)[1] if dated else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fail on a benchmark regression beyond the stated ratios.")
    parser.add_argument(
        "files", nargs="+", type=Path, help="BASELINE.json NEW.json, or NEW.json with --baseline-dir"
    )
    parser.add_argument("--baseline-dir", type=Path, help="take the newest other results file in this folder")
    parser.add_argument("--thresholds", type=Path, default=THRESHOLDS)
    args = parser.parse_args(argv)
    if args.baseline_dir is not None:
        if len(args.files) != 1:
            parser.error("with --baseline-dir give only NEW.json")
        new_path = args.files[0]
        found = newest(args.baseline_dir, new_path)
        if found is None:
            print(f"compare: no baseline in {args.baseline_dir}; nothing to compare")
            return 0
        base_path = found
    elif len(args.files) == 2:
        base_path, new_path = args.files
    else:
        parser.error("give BASELINE.json NEW.json")
    try:
        baseline, new = json.loads(base_path.read_text()), json.loads(new_path.read_text())
        with args.thresholds.open("rb") as f:
            config = tomllib.load(f)["compare"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    rows, skipped = compare(baseline, new, config)
    print(
        f"compare: baseline {base_path} ({baseline['meta']['date']}), new {new_path} ({new['meta']['date']})"
    )
    print("| scenario / Ferry | metric (Ferry/floor) | baseline | new | change | bound | ok |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        bound = f"≤ {r.bound}" if r.metric == "p99" else f"≥ {r.bound}"
        verdict = "yes" if r.ok else "**REGRESSION**"
        numbers = f"{r.baseline:.3f} | {r.new:.3f} | {r.change:.2f}"
        print(f"| {r.key} | {r.metric} | {numbers} | {bound} | {verdict} |")
    for line in skipped:
        print(f"compare: not compared: {line}")
    if not rows:
        print("compare: no scenario could be compared")
        return 0
    regressions = [r for r in rows if not r.ok]
    print(f"compare: {len(regressions)} regression(s) in {len(rows)} comparisons")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
