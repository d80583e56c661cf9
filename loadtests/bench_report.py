"""What the benchmark reports: ratios between servers, the targets of ``thresholds.toml`` (met or
missed), notes explaining the numbers, and the outputs: the results JSON, the Markdown tables, the PNG
chart and ``docs/benchmarks.md`` (filled into ``benchmarks.md.in``)."""

from __future__ import annotations

import argparse
import json
import os
import string
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_measure import Run

HERE = Path(__file__).resolve().parent
THRESHOLDS = HERE / "thresholds.toml"


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


# -------------------------------------------------------------------------------------------- ratios, targets
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


# ---------------------------------------------------------------------------------------------------- outputs
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
