"""What a check leaves: ``report.json`` (every number, for machines), ``report.md`` (for the pull
request or the promotion ticket), ``latency.svg`` (p50 and p99 per batch size, candidate beside the
compared version; SVG written directly, no plotting library) and the summary printed on stdout."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

FILES = ("report.md", "report.json", "latency.svg")


def write_report(folder: Path, result: dict[str, Any]) -> list[Path]:
    """Write the three files into ``folder`` (created if needed); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = (
        markdown(result),
        json.dumps(_plain(result), indent=2, allow_nan=False) + "\n",
        latency_svg(result),
    )
    paths = [folder / name for name in FILES]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text)
    return paths


def _plain(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _who(side: dict[str, Any] | None) -> str:
    if not side:
        return "none"
    version = side.get("version")
    flavor = f", {side['flavor']}" if side.get("flavor") else ""
    return f"{side['uri']} (version {version}{flavor})" if version else side["uri"]


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:+.1f} MiB"


def markdown(result: dict[str, Any]) -> str:
    candidate, against = result["candidate"], result.get("against")
    sides = [("candidate", candidate)] + ([("compared", against)] if against else [])
    verdict = "PASSED" if result.get("passed") else "FAILED"
    data = result.get("data", {})
    lines = [
        f"# ferry check: {verdict}",
        "",
        f"- candidate: `{_who(candidate)}`",
        f"- compared with: `{_who(against)}`"
        if against
        else "- compared with: nothing (no version given, "
        "and the candidate's model has no `champion` alias): only the candidate's own checks ran",
        f"- data: {data.get('source')}, {_num(data.get('rows'), 'd')} rows"
        + (f", labels in `{data['label']}`" if data.get("label") else ""),
        f"- batcher: at most {result['batch_max_rows']} rows per call (FERRY_BATCH__MAX_ROWS); "
        f"{result['requests']} timed calls per batch size and version",
        f"- ferry {result['ferry_version']}, {result['created']}",
        "",
        "## Checks",
        "",
        "| check | result | value | limit | detail |",
        "|---|---|---|---|---|",
    ]
    for check in result.get("checks", []):
        mark = "pass" if check["passed"] else "**FAIL**"
        value, limit = check["value"], check["limit"]
        lines.append(f"| `{check['name']}` | {mark} | {_cell(value)} | {_cell(limit)} | {check['detail']} |")
    if not result.get("checks"):
        lines.append("| - | - | - | - | nothing to check |")
    if "outputs" in candidate:
        lines += [
            "",
            "## Outputs",
            "",
            "| version | output | dtype | shape | kind |",
            "|---|---|---|---|---|",
        ]
        for label, side in sides:
            for o in side.get("outputs", []):
                lines.append(f"| {label} | `{o['name']}` | {o['dtype']} | {o['shape']} | {o['kind']} |")
    if result.get("agreement"):
        lines += [
            "",
            "## Agreement",
            "",
            "| output | kind | rows | agreement | max abs diff | mean abs diff | p50 | p90 | p99 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, a in result["agreement"].items():
            q = a.get("abs_diff_quantiles", {})
            lines.append(
                f"| `{name}`{_renamed(a)} | {a['kind']} | {a['rows']} | {a['agreement']:.4%} "
                f"| {_num(a.get('max_abs_diff'))} | {_num(a.get('mean_abs_diff'))} "
                f"| {_num(q.get('p50'))} | {_num(q.get('p90'))} "
                f"| {_num(q.get('p99'))} |"
            )
    if any(side.get("label_output") for _, side in sides):
        lines += [
            "",
            "## Against the labels",
            "",
            "| version | output | accuracy | mean abs error |",
            "|---|---|---|---|",
        ]
        for label, side in sides:
            lines.append(
                f"| {label} | `{side.get('label_output')}` | {_num(side.get('accuracy'))} "
                f"| {_num(side.get('mean_abs_error'))} |"
            )
    if any(side.get("latency") for _, side in sides):
        lines += [
            "",
            "## Latency and throughput",
            "",
            "Each call through the version's batcher, as a request's rows reach the model (no HTTP).",
            "",
            "| version | rows per call | p50 ms | p99 ms | mean ms | rows/s |",
            "|---|---|---|---|---|---|",
        ]
        for label, side in sides:
            for stats in side.get("latency", {}).values():
                lines.append(
                    f"| {label} | {stats['rows']} | {_num(stats['p50_ms'], '.3f')} "
                    f"| {_num(stats['p99_ms'], '.3f')} "
                    f"| {_num(stats['mean_ms'], '.3f')} | {_num(stats['rows_per_s'], ',.0f')} |"
                )
        lines += ["", "![latency](latency.svg)"]
    if any("load_s" in side for _, side in sides):
        lines += [
            "",
            "## Loading",
            "",
            "Download, load and warm-up, as `ferry serve` does; memory is the process's resident growth "
            "(the compared version loads first and also pays for importing its framework).",
            "",
            "| version | load s | RSS delta | runtime | device |",
            "|---|---|---|---|---|",
        ]
        for label, side in sides:
            if "load_s" in side:
                lines.append(
                    f"| {label} | {side['load_s']:.2f} | {_mib(side.get('rss_delta_bytes'))} "
                    f"| {side.get('runtime')} | {side.get('device')} |"
                )
    if data.get("ignored_columns"):
        lines += [
            "",
            f"Columns of the data the candidate does not take (left out): {data['ignored_columns']}",
        ]
    return "\n".join(lines) + "\n"


def _renamed(agreement: dict[str, Any]) -> str:
    other = agreement.get("compared_output")
    return f" (compared: `{other}`)" if other else ""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _num(value)
    if value is None:
        return "-"
    return f"`{json.dumps(_plain(value))}`".replace("|", "\\|")


def latency_svg(result: dict[str, Any]) -> str:
    """Horizontal bars: per batch size, p50 and p99 of the candidate and of the compared version."""
    bars: list[tuple[str, str, float]] = []  # (group label, series, ms)
    series = [("candidate", result["candidate"])]
    if result.get("against"):
        series.append(("compared", result["against"]))
    keys = list(dict.fromkeys(k for _, side in series for k in side.get("latency", {})))
    for key in keys:
        for stat in ("p50_ms", "p99_ms"):
            for label, side in series:
                stats = side.get("latency", {}).get(key)
                if stats and stats.get(stat) is not None:
                    rows = stats["rows"]
                    bars.append(
                        (f"{rows} row{'s' if rows > 1 else ''} {stat[:3]}", label, float(stats[stat]))
                    )
    colors = {"candidate": "#3367d6", "compared": "#9e9e9e"}
    left, width, bar_h, gap = 150, 420, 16, 6
    height = 50 + len(bars) * (bar_h + gap) + 30
    top = max((ms for _, _, ms in bars), default=1.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 110}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">Latency per call (ms): '
        f"{escape(_who(result['candidate']))}</text>",
    ]
    y = 40
    for i, (group, label, ms) in enumerate(bars):
        w = max(1.0, width * ms / top)
        out.append(f'<text x="10" y="{y + 12}">{escape(group)}</text>')
        out.append(
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[label]}">'
            f"<title>{escape(label)} {escape(group)}: {ms:.3f} ms</title></rect>"
        )
        out.append(f'<text x="{left + w + 4:.1f}" y="{y + 12}">{ms:.3f} ({escape(label)})</text>')
        y += bar_h + gap
        if len(series) > 1 and i % len(series) == len(series) - 1:
            y += 4
    legend_y = y + 16
    for i, (label, _) in enumerate(series):
        x = left + i * 120
        out.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" fill="{colors[label]}"/>')
        out.append(f'<text x="{x + 16}" y="{legend_y}">{escape(label)}</text>')
    if not bars:
        out.append(f'<text x="10" y="{y + 12}">no latency measured</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def summary(result: dict[str, Any], files: list[Path]) -> str:
    """The few lines printed at the end."""
    candidate, against = result["candidate"], result.get("against")
    data = result.get("data", {})
    lines = [
        f"ferry check: {_who(candidate)}"
        + (f" against {_who(against)}" if against else " (nothing to compare)")
    ]
    lines.append(
        f"data: {data.get('source')}, {_num(data.get('rows'), 'd')} rows"
        + (f", label {data['label']}" if data.get("label") else "")
    )
    for name, a in result.get("agreement", {}).items():
        diff = f", max |diff| {_num(a['max_abs_diff'])}" if "max_abs_diff" in a else ""
        other = f" with {a['compared_output']}" if a.get("compared_output") else ""
        lines.append(f"agreement {name}{other}: {a['agreement']:.2%} ({a['kind']}{diff})")
    if candidate.get("accuracy") is not None:
        theirs = (
            f" (compared {against['accuracy']:.4f})"
            if against and against.get("accuracy") is not None
            else ""
        )
        lines.append(f"accuracy: {candidate['accuracy']:.4f}{theirs}")
    if candidate.get("mean_abs_error") is not None:
        theirs = (
            f" (compared {_num(against['mean_abs_error'])})"
            if against and against.get("mean_abs_error") is not None
            else ""
        )
        lines.append(f"mean abs error: {_num(candidate['mean_abs_error'])}{theirs}")
    for key, stats in candidate.get("latency", {}).items():
        other = (against or {}).get("latency", {}).get(key)
        theirs = f" (compared {other['p50_ms']:.2f}/{other['p99_ms']:.2f})" if other else ""
        lines.append(
            f"latency {stats['rows']} row(s) p50/p99 ms: "
            f"{stats['p50_ms']:.2f}/{stats['p99_ms']:.2f}{theirs}, "
            f"{_num(stats['rows_per_s'], ',.0f')} rows/s"
        )
    if "load_s" in candidate:
        theirs = (
            f" (compared {against['load_s']:.2f} s, {_mib(against.get('rss_delta_bytes'))})"
            if against and "load_s" in against
            else ""
        )
        lines.append(
            f"load: {candidate['load_s']:.2f} s, RSS {_mib(candidate.get('rss_delta_bytes'))}{theirs}"
        )
    checks = result.get("checks", [])
    failed = [c for c in checks if not c["passed"]]
    lines.append(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    lines += [f"FAILED {c['name']}: {c['detail']}" for c in failed]
    lines.append("report: " + ", ".join(str(f) for f in files))
    return "\n".join(lines)
