"""monitoring/ checked offline: Prometheus config and rules (promtool), rule unit tests, alert
annotations and runbook, Alertmanager (amtool), Grafana dashboards and provisioning."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from monitoring_support import (
    ALERTMANAGER_YML,
    ANGULAR_PANELS,
    DASHBOARD_UIDS,
    DASHBOARDS_DIR,
    EXTERNAL_METRICS,
    GRAFANA_BUILTINS,
    HTTP_METRICS,
    PROMETHEUS_YML,
    PROVISIONING_DIR,
    RULE_TESTS_DIR,
    RUNBOOK,
    alerts,
    dashboard_exprs,
    dashboards,
    exposed_names,
    gpu_metric_names,
    metric_names,
    panels,
    recorded_names,
    require_tool,
    rule_files,
    run_tool,
    substitute,
    used_metric_names,
    variables_used,
)
from service.metrics import Metrics

# Prometheus ----------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run_tool(require_tool("promtool"), "check", "config", PROMETHEUS_YML)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout


def test_prometheus_scrapes_ferry_and_redis_under_the_job_names_the_rules_use() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"ferry", "redis"} <= jobs
    assert config["alerting"]["alertmanagers"]


def test_promtool_check_rules() -> None:
    result = run_tool(require_tool("promtool"), "check", "rules", *rule_files())
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("SUCCESS") == len(rule_files())


def test_promtool_test_rules() -> None:
    files = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert files
    result = run_tool(require_tool("promtool"), "test", "rules", *files)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def _alert_checks() -> dict[str, list[tuple[str, float, bool]]]:
    """{alert: [(test name, eval time in seconds, fired?)]} over every promtool test case."""
    checks: dict[str, list[tuple[str, float, bool]]] = {}
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        for i, case in enumerate(yaml.safe_load(path.read_text())["tests"]):
            name = f"{path.name}: {case.get('name', i)}"
            for check in case.get("alert_rule_test", []):
                fired = bool(check.get("exp_alerts"))
                checks.setdefault(check["alertname"], []).append((name, _seconds(check["eval_time"]), fired))
    return checks


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration))


@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_every_alert_is_tested_pending_firing_and_resolved(alert: str) -> None:
    """One test case checks the alert silent before it fires (pending, or before the fault), firing,
    and silent again after it (resolved); some case checks it silent on healthy data."""
    checks = _alert_checks().get(alert, [])
    by_case: dict[str, list[tuple[float, bool]]] = {}
    for case, at, fired in checks:
        by_case.setdefault(case, []).append((at, fired))
    lifecycle = [
        case
        for case, seq in by_case.items()
        if any(
            f and any(not g and t < at for t, g in seq) and any(not g and t > at for t, g in seq)
            for at, f in seq
        )
    ]
    assert lifecycle, f"{alert}: no test case checks it silent, then firing, then resolved: {checks}"


def test_alerts_have_severity_and_annotations_with_a_runbook_section() -> None:
    anchors = _runbook_anchors()
    bases = set()
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        base, _, anchor = annotations["runbook_url"].partition("#")
        assert base.endswith("/monitoring/RUNBOOK.md"), name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no RUNBOOK.md section #{anchor}"
        bases.add(base)
    assert len(bases) == 1, bases


def test_every_runbook_alert_section_is_an_alert() -> None:
    names = {a["alert"] for a in alerts()}
    sections = re.findall(r"^## (\w+)\s*$", RUNBOOK.read_text(), flags=re.M)
    assert set(sections) == names


def _runbook_anchors() -> set[str]:
    """GitHub's anchors of RUNBOOK.md's headings: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+?)\s*$", RUNBOOK.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


# Alertmanager --------------------------------------------------------------------------------------


def test_amtool_check_config() -> None:
    result = run_tool(require_tool("amtool"), "check-config", ALERTMANAGER_YML)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=FerryErrorBudgetBurnFast"], "oncall"),
        (["severity=warning", "alertname=FerryQueueSaturated"], "slack-warnings"),
        (["alertname=Unlabelled"], "slack-warnings"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = require_tool("amtool")
    result = run_tool(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
    assert result.returncode == 0, result.stdout
    assert result.stdout.split()[-1] == receiver, result.stdout


def test_alertmanager_reads_secrets_from_files_only() -> None:
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    inline = {"slack_api_url", "smtp_auth_password", "api_url", "auth_password", "auth_secret", "url"}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                assert key not in inline, f"{path}.{key}: a secret inline; use {key}_file"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(config, "alertmanager")
    assert config["global"]["slack_api_url_file"].startswith("/run/secrets/")
    assert config["global"]["smtp_auth_password_file"].startswith("/run/secrets/")
    assert "hooks.slack.com" not in ALERTMANAGER_YML.read_text()
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["oncall"]["slack_configs"] and receivers["oncall"]["email_configs"]


# Grafana -------------------------------------------------------------------------------------------


def test_dashboard_files_and_uids_are_the_expected_ones() -> None:
    found = {name: dashboard["uid"] for name, dashboard in dashboards().items()}
    assert found == DASHBOARD_UIDS


@pytest.mark.parametrize("file", sorted(DASHBOARD_UIDS))
def test_dashboard_structure(file: str) -> None:
    dashboard = dashboards()[file]
    assert dashboard["title"].startswith("Ferry / ")
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "__inputs" not in dashboard and "__requires" not in dashboard  # file provisioning
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]
    all_panels = list(panels(dashboard))
    rows = [p for p in all_panels if p["type"] == "row"]
    assert rows and all_panels[0]["type"] == "row", "panels are grouped in rows"
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        where = f"{file} panel {panel['id']} {panel['title']!r}"
        assert panel["type"] not in ANGULAR_PANELS, f"{where}: Angular panel type {panel['type']}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("description", "").strip(), f"{where}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert (
            set(panel["gridPos"]) == {"h", "w", "x", "y"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["targets"], f"{where}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], where


def _ranges_of(function: str, expr: str) -> list[str]:
    """The range (text between the last [ ] of the argument) of each call of ``function`` in expr."""
    out = []
    for match in re.finditer(rf"(?<![\w:]){function}\s*\(", expr):
        depth, i = 1, match.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        ranges = re.findall(r"\[([^\[\]]*)\]", expr[match.end() : i])
        out.append(ranges[-1] if ranges else "")
    return out


def test_rates_use_rate_interval() -> None:
    checked = 0
    for file, dashboard in dashboards().items():
        for where, expr in dashboard_exprs(dashboard):
            for function in ("rate", "irate"):
                for window in _ranges_of(function, expr):
                    assert window == "$__rate_interval", f"{file} {where}: {function}(...[{window}])"
                    checked += 1
            for window in _ranges_of("increase", expr):
                assert window in {"$__rate_interval", "$__range"}, f"{file} {where}: increase [{window}]"
    assert checked > 20


def test_range_helper_finds_a_fixed_window() -> None:
    assert _ranges_of("rate", 'sum(rate(x{a="b"}[5m])) / sum(irate(y[$__rate_interval]))') == ["5m"]


def test_dashboard_variables_are_defined() -> None:
    for file, dashboard in dashboards().items():
        defined = {v["name"] for v in dashboard["templating"]["list"]} | set(GRAFANA_BUILTINS)
        for where, expr in dashboard_exprs(dashboard):
            missing = variables_used(expr) - defined
            assert not missing, f"{file} {where}: undefined variables {missing}"


def _check_promql(exprs: list[tuple[str, str]], tmp_path: Path) -> tuple[bool, str]:
    """Wrap each expression as a recording rule and run promtool check rules on the file."""
    rules = [{"record": f"dashboard:expr:{i}", "expr": substitute(expr)} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run_tool(require_tool("promtool"), "check", "rules", path)
    index = "\n".join(f"{i}: {where}: {expr}" for i, (where, expr) in enumerate(exprs))
    return result.returncode == 0, f"{result.stdout}\n{index}"


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    exprs = [(f"{file} {where}", e) for file, d in dashboards().items() for where, e in dashboard_exprs(d)]
    assert len(exprs) > 60
    ok, report = _check_promql(exprs, tmp_path)
    assert ok, report


def test_the_promql_check_rejects_a_broken_expression(tmp_path: Path) -> None:
    ok, report = _check_promql(
        [("good", "sum(rate(x[$__rate_interval]))"), ("bad", "sum(rate(x[5m])")], tmp_path
    )
    assert not ok and "1: bad" in report


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, handler) (rate(a_bucket{job=~"x", h="{b}"}[5m]))) '
        "/ ignoring (class) group_left () sum without (x) (b:c:rate5m offset 1h) > bool 1e3 "
        "and on (job) absent(up == 1) or vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "up"}


def _ferry_metric_names() -> set[str]:
    """Names service/metrics.py exports (live test: a real scrape) plus service/gpu.py's."""
    return exposed_names(generate_latest(Metrics(CollectorRegistry()).registry).decode()) | gpu_metric_names()


def test_every_metric_used_is_exported_or_allow_listed() -> None:
    known = _ferry_metric_names() | recorded_names() | set(EXTERNAL_METRICS) | set(HTTP_METRICS)
    used = used_metric_names()
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not unknown, f"metrics used but exported by nothing known: {unknown}"
    stale = (set(EXTERNAL_METRICS) | set(HTTP_METRICS)) - set(used)
    assert not stale, f"allow-listed but used nowhere: {stale}"
    unused_records = recorded_names() - set(used)
    assert not unused_records, f"recording rules that no alert or dashboard reads: {unused_records}"


def test_every_gpu_metric_is_on_the_gpu_dashboard() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(dashboards()["gpu.json"]))
    assert {n for n in gpu_metric_names() if n.startswith("ferry_gpu_")} <= metric_names(
        substitute(exprs)
    ) | {
        "ferry_gpu_memory_used_bytes",
        "ferry_gpu_memory_total_bytes",
    }


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((PROVISIONING_DIR / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:")
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the scrape interval"
    providers = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "ferry.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"] and providers[0]["options"]["path"]
    assert DASHBOARDS_DIR.is_dir()


def test_thresholds_match_the_alerts() -> None:
    """The objective lines drawn on the dashboards are the thresholds the alerts use."""
    by_name = {a["alert"]: a["expr"] for a in alerts()}
    assert "> 0.1" in by_name["FerryLatencyP99High"]
    assert "> 0.8" in by_name["FerryQueueSaturated"]
    assert "> 0.9" in by_name["FerryGpuMemoryHigh"]
    assert "> 85" in by_name["FerryGpuTemperatureHigh"]
    steps = {
        (file, p["title"]): [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
        for file, d in dashboards().items()
        for p in panels(d)
        if p["type"] != "row"
    }
    assert 0.1 in steps[("overview.json", "Inference latency (HTTP): p50, p95, p99")]
    assert 0.8 in steps[("overview.json", "Batch queue fill")]
    assert 0.9 in steps[("gpu.json", "GPU memory in use (share)")]
    assert 85 in steps[("gpu.json", "Temperature")]
    assert all(v is None or math.isfinite(v) for values in steps.values() for v in values)
