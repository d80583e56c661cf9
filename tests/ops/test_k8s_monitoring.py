"""Ferry's monitoring on Kubernetes (deploy/components/monitoring, rendered through
deploy/overlays/monitoring), checked offline:

- the committed manifests are exactly what generate.py writes from monitoring/ (one source of truth),
  and the check notices a changed source;
- Kustomize renders them into the namespace the NetworkPolicy opens the metrics port to;
- the PrometheusRule validates against prometheus-operator v0.93.0's CRD (tests/data, as a JSON Schema:
  ``crd_support``), holds exactly the rule files' groups, passes ``promtool check rules`` once extracted,
  and passes the same promtool unit tests as the rule files (monitoring/prometheus/tests);
- each dashboard is a ConfigMap Grafana's sidecar selects, holding the dashboard unchanged;
- the Alertmanager Secret is a configuration ``amtool check-config`` accepts, routes and receivers as in
  monitoring/alertmanager, its credential files and templates where the operator mounts them, under the
  names deploy/cluster/kube-prometheus-stack-values.yaml gives the chart.

What only a cluster can show: the operator loading the rule and the configuration, Grafana's sidecar
importing the dashboards, Slack and email reaching people.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_support import DATA, crd

from delivery_support import DEPLOY, kustomize_command, rendered, run
from monitoring_support import (
    ALERTMANAGER_YML,
    DASHBOARDS_DIR,
    MONITORING,
    RULE_TESTS_DIR,
    require_tool,
    rule_files,
    run_tool,
)

COMPONENT = DEPLOY / "components" / "monitoring"
OVERLAY = DEPLOY / "overlays" / "monitoring"
GENERATE = COMPONENT / "generate.py"
VALUES = DEPLOY / "cluster" / "kube-prometheus-stack-values.yaml"
OPERATOR = DATA / "prometheus-operator-v0.93.0"
"""prometheus-operator v0.93.0 (tag commit f8fafd475f3d132e239432ae6172de60a6cb6516)."""
RULE_CRD = OPERATOR / "monitoring.coreos.com_prometheusrules.yaml"
SERVICE_MONITOR_CRD = OPERATOR / "monitoring.coreos.com_servicemonitors.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
LAST_APPLIED_LIMIT = 262_144
"""Bytes of annotations an object may carry: `kubectl apply` keeps the whole object in one."""


@cache
def monitoring_resources() -> tuple[dict[str, Any], ...]:
    result = run(*kustomize_command(), OVERLAY)
    assert result.returncode == 0, result.stdout
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in monitoring_resources() if doc["kind"] == kind]


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(VALUES.read_text())
    return loaded


def generate(*args: str | Path) -> tuple[int, str]:
    import sys

    result = run(sys.executable, GENERATE, *args)
    return result.returncode, result.stdout


# One source of truth ---------------------------------------------------------------------------------


def test_the_committed_manifests_are_what_generate_writes() -> None:
    code, out = generate("--check")
    assert code == 0, out


def test_the_check_notices_a_changed_source(tmp_path: Path) -> None:
    source = tmp_path / "monitoring"
    shutil.copytree(MONITORING, source)
    alerts = source / "prometheus" / "rules" / "alerts.yml"
    alerts.write_text(alerts.read_text().replace("for: 2m", "for: 3m", 1))
    dashboard = source / "grafana" / "dashboards" / "overview.json"
    dashboard.write_text(dashboard.read_text().replace('"ferry-overview"', '"ferry-overview-2"', 1))
    code, out = generate("--check", "--monitoring", source)
    assert code == 1 and "prometheusrule.yaml" in out and "dashboards.yaml" in out, out
    assert "alertmanager.yaml" not in out.splitlines()[-1]
    # Written into a copy, then checked against that copy: up to date.
    copy = tmp_path / "component"
    copy.mkdir()
    assert generate("--monitoring", source, "--out", copy)[0] == 0
    assert generate("--check", "--monitoring", source, "--out", copy)[0] == 0


def test_a_credential_file_the_generator_does_not_map_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "monitoring"
    shutil.copytree(MONITORING, source)
    config = source / "alertmanager" / "alertmanager.yml"
    config.write_text(
        config.read_text().replace(
            "smtp_require_tls: true", "smtp_require_tls: true\n  opsgenie_api_key_file: /run/secrets/opsgenie"
        )
    )
    code, out = generate("--check", "--monitoring", source, "--out", tmp_path)
    assert code != 0 and "global.opsgenie_api_key_file" in out and "/run/secrets/opsgenie" in out, out


# Rendering -------------------------------------------------------------------------------------------


def test_the_overlay_renders_every_resource_into_the_monitoring_namespace() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in monitoring_resources())
    dashboards = sorted(p.stem for p in DASHBOARDS_DIR.glob("*.json"))
    assert kinds == sorted(
        [("PrometheusRule", "ferry"), ("Secret", "ferry-alertmanager")]
        + [("ConfigMap", f"ferry-dashboard-{stem}") for stem in dashboards]
    )
    # The namespace the environments' NetworkPolicy opens Ferry's metrics port to.
    (policy,) = [doc for doc in rendered("production") if doc["kind"] == "NetworkPolicy"]
    selectors = [
        peer["namespaceSelector"].get("matchLabels", {})
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    ]
    monitoring_namespace = next(s["kubernetes.io/metadata.name"] for s in selectors if s)
    assert {doc["metadata"]["namespace"] for doc in monitoring_resources()} == {monitoring_namespace}


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret"])
def test_built_in_kinds_validate_strictly(kind: str) -> None:
    for doc in of_kind(kind):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        size = len(json.dumps(doc).encode())
        assert size < LAST_APPLIED_LIMIT, f"{doc['metadata']['name']}: {size} bytes cannot be applied"


# The PrometheusRule ----------------------------------------------------------------------------------


def test_the_prometheus_rule_validates_against_the_operators_crd() -> None:
    schema = crd(RULE_CRD)
    assert schema.rules == (), "a CEL rule appeared in the CRD: check it here"
    (rule,) = of_kind("PrometheusRule")
    assert schema.errors(rule) == []
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["fore"] = "2m"
    assert schema.errors(broken) != [], "a misspelt field is caught"


def test_the_prometheus_rule_holds_exactly_the_rule_files() -> None:
    (rule,) = of_kind("PrometheusRule")
    expected = [group for path in rule_files() for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected


def _extracted(tmp_path: Path) -> Path:
    (rule,) = of_kind("PrometheusRule")
    path = tmp_path / "extracted.rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_checks_the_rules_extracted_from_the_prometheus_rule(tmp_path: Path) -> None:
    result = run_tool(require_tool("promtool"), "check", "rules", _extracted(tmp_path))
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout


def test_the_extracted_rules_pass_the_rule_files_unit_tests(tmp_path: Path) -> None:
    """monitoring/prometheus/tests/*.test.yml, each pointed at the extracted rules instead of the files."""
    extracted = _extracted(tmp_path)
    tests = []
    for path in sorted(RULE_TESTS_DIR.glob("*.test.yml")):
        case = yaml.safe_load(path.read_text())
        assert case["rule_files"], path
        case["rule_files"] = [str(extracted)]
        target = tmp_path / path.name
        target.write_text(yaml.safe_dump(case, sort_keys=False))
        tests.append(target)
    assert tests
    result = run_tool(require_tool("promtool"), "test", "rules", *tests)
    assert result.returncode == 0, result.stdout


def test_the_service_monitor_validates_against_the_operators_crd() -> None:
    schema = crd(SERVICE_MONITOR_CRD)
    for env in ("staging", "production"):
        (monitor,) = [doc for doc in rendered(env) if doc["kind"] == "ServiceMonitor"]
        assert schema.errors(monitor) == [], env


# Dashboards ------------------------------------------------------------------------------------------


def test_every_dashboard_is_a_config_map_for_grafanas_sidecar() -> None:
    sidecar = values()["grafana"]["sidecar"]["dashboards"]
    assert sidecar["enabled"] is True
    maps = {doc["metadata"]["name"]: doc for doc in of_kind("ConfigMap")}
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        config_map = maps[f"ferry-dashboard-{path.stem}"]
        assert config_map["metadata"]["labels"][sidecar["label"]] == sidecar["labelValue"]
        assert config_map["metadata"]["annotations"][sidecar["folderAnnotation"]] == "Ferry"
        assert list(config_map["data"]) == [path.name]
        assert config_map["data"][path.name] == path.read_text(), "the dashboard, byte for byte"
        assert json.loads(config_map["data"][path.name])["uid"].startswith("ferry-")


# Alertmanager ----------------------------------------------------------------------------------------


def _alertmanager() -> tuple[dict[str, Any], dict[str, Any]]:
    (secret,) = of_kind("Secret")
    return secret, yaml.safe_load(secret["stringData"]["alertmanager.yaml"])


def _file_settings(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if str(k).endswith("_file") and isinstance(v, str)]
        return found + [f for v in node.values() for f in _file_settings(v)]
    if isinstance(node, list):
        return [f for v in node for f in _file_settings(v)]
    return []


def test_the_alertmanager_secret_is_the_charts_config_secret() -> None:
    secret, config = _alertmanager()
    spec = values()["alertmanager"]["alertmanagerSpec"]
    assert spec["useExistingSecret"] is True and spec["configSecret"] == secret["metadata"]["name"]
    # Credentials: read from the Secret the chart mounts under /etc/alertmanager/secrets/<name>/.
    files = _file_settings(config)
    assert files, "the Slack URL and SMTP password come from files"
    (credentials,) = spec["secrets"]
    for path in files:
        assert path.startswith(f"/etc/alertmanager/secrets/{credentials}/"), path
    # Templates: every key of the config Secret lands in /etc/alertmanager/config/.
    assert config["templates"] == ["/etc/alertmanager/config/*.tmpl"]
    templates = sorted(p.name for p in (ALERTMANAGER_YML.parent / "templates").glob("*.tmpl"))
    assert templates and sorted(k for k in secret["stringData"] if k.endswith(".tmpl")) == templates


def test_the_alertmanager_config_routes_as_the_compose_one() -> None:
    _, config = _alertmanager()
    source = yaml.safe_load(ALERTMANAGER_YML.read_text())
    for key in ("route", "receivers", "inhibit_rules"):
        assert config[key] == source[key], key
    changed = {k for k in source["global"] if source["global"][k] != config["global"][k]}
    assert changed == {"slack_api_url_file", "smtp_auth_password_file"}


def test_amtool_accepts_the_alertmanager_config(tmp_path: Path) -> None:
    """The configuration and its templates as the operator mounts them, moved under tmp_path."""
    secret, config = _alertmanager()
    root = tmp_path / "etc" / "alertmanager"
    (root / "config").mkdir(parents=True)
    for key, text in secret["stringData"].items():
        (root / "config" / key).write_text(text)
    for path in _file_settings(config):
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("https://hooks.slack.com/services/T0/B0/x\n" if "slack" in path else "pw\n")
    moved = (root / "config" / "alertmanager.yaml").read_text().replace("/etc/alertmanager/", f"{root}/")
    (root / "config" / "alertmanager.yaml").write_text(moved)
    result = run_tool(require_tool("amtool"), "check-config", root / "config" / "alertmanager.yaml")
    assert result.returncode == 0, result.stdout
    # The configuration, then each template file parsed.
    templates = [k for k in secret["stringData"] if k.endswith(".tmpl")]
    assert f"{len(templates)} templates" in result.stdout and result.stdout.count("SUCCESS") == 2, (
        result.stdout
    )


def test_the_chart_selects_rules_and_service_monitors_without_its_release_label() -> None:
    spec = values()["prometheus"]["prometheusSpec"]
    assert spec["ruleSelectorNilUsesHelmValues"] is False
    assert spec["serviceMonitorSelectorNilUsesHelmValues"] is False
    (rule,) = of_kind("PrometheusRule")
    assert "release" not in rule["metadata"]["labels"]
