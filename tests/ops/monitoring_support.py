"""Helpers shared by the monitoring tests: file locations, tools, rules, dashboards, PromQL names.

Imported by ``test_monitoring.py`` (offline checks) and ``test_monitoring_live.py`` (a live Ferry and a
real Prometheus). Nothing here is a test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from delivery_support import run
from service.gpu import GpuCollector

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
RULES_DIR = MONITORING / "prometheus" / "rules"
RULE_TESTS_DIR = MONITORING / "prometheus" / "tests"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
PROVISIONING_DIR = MONITORING / "grafana" / "provisioning"
RUNBOOK = MONITORING / "RUNBOOK.md"

DASHBOARD_UIDS = {
    "overview.json": "ferry-overview",
    "model.json": "ferry-model",
    "cache.json": "ferry-cache",
    "gpu.json": "ferry-gpu",
}
"""Stable uids: links, bookmarks and alert annotations point at them; never change one."""

EXTERNAL_METRICS = {
    "up": "Prometheus: synthetic, one per scrape target",
    "redis_up": "oliver006/redis_exporter (exporter/redis.go)",
    "redis_memory_used_bytes": "oliver006/redis_exporter (INFO used_memory)",
    "redis_memory_max_bytes": "oliver006/redis_exporter (INFO maxmemory)",
    "redis_connected_clients": "oliver006/redis_exporter (INFO connected_clients)",
    "redis_commands_processed_total": "oliver006/redis_exporter (INFO total_commands_processed)",
    "redis_evicted_keys_total": "oliver006/redis_exporter (INFO evicted_keys)",
    "redis_expired_keys_total": "oliver006/redis_exporter (INFO expired_keys)",
    "redis_db_keys": "oliver006/redis_exporter (INFO keyspace)",
}
"""Metrics the dashboards and rules read that Ferry does not export, with where they come from."""

HTTP_METRICS = {
    name: "prometheus-fastapi-instrumentator, as service/api configures it"
    for name in (
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_request_size_bytes_sum",
        "http_request_size_bytes_count",
        "http_response_size_bytes_sum",
        "http_response_size_bytes_count",
        "http_requests_inprogress",
    )
}
"""Ferry's HTTP-layer metrics. The offline test takes them on trust; the live test requires them in a
real scrape instead."""

GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
ANGULAR_PANELS = {"graph", "singlestat", "table-old", "grafana-piechart-panel", "grafana-worldmap-panel"}


def require_tool(name: str) -> str:
    """The tool's path; fails (does not skip) with how to get it, since `make test` installs it."""
    path = shutil.which(name)
    if path is None:
        package = {"amtool": "prometheus-alertmanager"}.get(name, "prometheus")
        pytest.fail(f"{name} is missing: run `make tools` or `apt-get install {package}` (Debian)")
    return path


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded wait; output in .stdout, both streams merged."""
    return run(*args, timeout=120)


# Rules ---------------------------------------------------------------------------------------------


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    """Every rule of every rule file, with ``_file`` and ``_group`` added."""
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "_file": path.name, "_group": group["name"]})
    return out


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


# Dashboards ----------------------------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every ``label_values(<selector>, label)`` variable."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel['id']} {panel.get('title')!r} {target['refId']}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\((.+),\s*[a-zA-Z_]\w*\s*\)\s*", text)
        if var.get("type") == "query" and match:
            out.append((f"variable {var['name']!r}", match.group(1)))
    return out


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def variables_used(expr: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in _VARIABLE.finditer(expr)}


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana's variables: built-in intervals by durations, others by ``values`` or ``.*``."""
    values = {**GRAFANA_BUILTINS, **(values or {})}
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ".*"), expr)


# PromQL names --------------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are neither functions nor keywords)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def used_metric_names() -> dict[str, set[str]]:
    """{metric name: where it is used} over every dashboard expression and every rule."""
    used: dict[str, set[str]] = {}
    for file, dashboard in dashboards().items():
        for where, expr in dashboard_exprs(dashboard):
            for name in metric_names(substitute(expr)):
                used.setdefault(name, set()).add(f"{file} {where}")
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"{rule['_file']} {rule.get('alert') or rule.get('record')}")
    return used


# Exported names ------------------------------------------------------------------------------------

_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}


def exposed_names(text: str) -> set[str]:
    """Series names a Prometheus text exposition offers, families without samples yet included."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in _SERIES_SUFFIXES.get(family.type, ("",)))
    return names


class _FakeNvml:
    """One device that answers every query, so that the collector shows every name it can export."""

    class NVMLError(Exception):
        pass

    def __getattr__(self, name: str) -> Any:
        values = {
            "nvmlDeviceGetCount": 1,
            "nvmlDeviceGetName": "fake",
            "nvmlDeviceGetUtilizationRates": SimpleNamespace(gpu=1),
            "nvmlDeviceGetMemoryInfo": SimpleNamespace(used=1, total=2),
        }
        return lambda *args: values.get(name, 1)


def register_fake_gpu(registry: CollectorRegistry) -> None:
    """Ferry's GPU collector on one fake device, so that it shows every family it can export."""
    registry.register(GpuCollector(_FakeNvml(), cuda_memory=lambda: [("cuda:0", 1, 2)]))


def gpu_metric_names() -> set[str]:
    """Every name service/gpu.py exports on a host with a GPU (none are exported on this one)."""
    registry = CollectorRegistry()
    register_fake_gpu(registry)
    return exposed_names(generate_latest(registry).decode())
