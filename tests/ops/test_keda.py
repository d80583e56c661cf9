"""Autoscaling with KEDA (deploy/components/keda/), rendered by Kustomize on top of each environment and
checked offline:

- the ScaledObject validates against KEDA v2.20.2's CRD (tests/data/keda-v2.20.2, as a JSON Schema:
  ``crd_support``), its CEL rule checked by hand, and passes what KEDA's admission webhook checks
  (unique trigger names, replica bounds, taking over the HPA an earlier apply left);
- it replaces the environment's HorizontalPodAutoscaler and keeps its namespace, bounds, behaviour and
  per-pod targets;
- its Prometheus queries parse (promtool), return one series (what KEDA's Prometheus scaler requires),
  read gauges Ferry exports (service/metrics.py, as ``create_app`` registers them) and select them only
  by labels Ferry's series carry once scraped through the ServiceMonitor;
- the trigger metadata are fields of KEDA's Prometheus scaler, with values it parses;
- the README's autoscaling note names the metrics and the component.

What only a cluster can show: KEDA's operator and metrics server serving the queries, the HPA it
creates or takes over, and Prometheus answering from the ServiceMonitor's scrape.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from crd_support import KEDA, crd
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from delivery_support import DEPLOY, OVERLAYS, ROOT, kustomize_command, one, rendered, run
from monitoring_support import metric_names, require_tool, run_tool
from service.api.app import create_app
from service.config import Settings
from service.metrics import Metrics

COMPONENT = DEPLOY / "components" / "keda"
SCHEMA = KEDA / "keda.sh_scaledobjects.yaml"
README = ROOT / "README.md"
ENVIRONMENTS = sorted(OVERLAYS)

# Facts of KEDA v2.20.2 (pkg/scalers/prometheus_scaler.go, apis/keda/v1alpha1/*.go).
PROMETHEUS_FIELDS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
    "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner",
}  # fmt: skip
"""prometheusMetadata's trigger metadata fields."""
PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
"""What Go's strconv.ParseBool accepts."""
TRANSFER_HPA = "scaledobject.keda.sh/transfer-hpa-ownership"
MIN_LE_MAX = (
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"
)
"""The CRD's one CEL rule, on spec; checked by ``cel_problems``."""
TARGET_LABELS = {"job", "namespace", "pod", "service", "endpoint", "instance", "container"}
"""Labels the Prometheus Operator gives every series of a ServiceMonitor's targets."""


def render(base: Path, workdir: Path, namespace: str | None = None) -> tuple[int, str]:
    """Kustomize's rendering of an overlay that stacks the component on ``base``."""
    overlay = workdir / f"keda-on-{base.name}-{namespace or 'plain'}"
    overlay.mkdir()
    kustomization: dict[str, Any] = {
        "resources": [os.path.relpath(base, overlay)],
        "components": [os.path.relpath(COMPONENT, overlay)],
    }
    if namespace:
        kustomization["namespace"] = namespace
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = run(*kustomize_command(), overlay)
    return result.returncode, result.stdout


@pytest.fixture(scope="module")
def stacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each environment with the component stacked on it, rendered."""
    out = {}
    for env in ENVIRONMENTS:
        code, text = render(OVERLAYS[env], tmp_path_factory.mktemp(env))
        assert code == 0, text
        out[env] = [d for d in yaml.safe_load_all(text) if d]
    return out


def scaled_object(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ScaledObject"]
    return found


def cel_problems(so: dict[str, Any]) -> list[str]:
    """The CRD's CEL rules, evaluated by hand: fails on a rule this test does not know."""
    problems = []
    for rule in crd(SCHEMA).rules:
        assert (rule.path, rule.rule) == (("spec",), MIN_LE_MAX), f"a CEL rule this test cannot check: {rule}"
        spec = so["spec"]
        if "minReplicaCount" in spec and spec["minReplicaCount"] > spec.get("maxReplicaCount", 100):
            problems.append(rule.message)
    return problems


def admission_problems(so: dict[str, Any], hpas: list[dict[str, Any]]) -> list[str]:
    """What KEDA's ScaledObject webhook denies: duplicate trigger names (ValidateTriggers), bounds
    (CheckReplicaCountBoundsAreValid), and an HPA already scaling the same workload that the
    ScaledObject neither owns nor takes over by name (verifyHpas)."""
    problems = []
    names = [t["name"] for t in so["spec"]["triggers"] if t.get("name")]
    if len(names) != len(set(names)):
        problems.append("duplicate trigger names")
    spec = so["spec"]
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("minReplicaCount above maxReplicaCount")
    target = spec["scaleTargetRef"]
    for hpa in hpas:
        theirs = hpa["spec"]["scaleTargetRef"]
        if (theirs["kind"], theirs["name"]) != (target.get("kind", "Deployment"), target["name"]):
            continue
        named = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("name")
        transfer = so["metadata"].get("annotations", {}).get(TRANSFER_HPA) == "true"
        if not (transfer and named == hpa["metadata"]["name"]):
            problems.append(f"HPA {hpa['metadata']['name']} already scales {target['name']}")
    return problems


# Schema and admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_scaled_object_validates_against_keda_s_crd(env: str, stacked: dict[str, Any]) -> None:
    so = scaled_object(stacked[env])
    schema = crd(SCHEMA)
    assert so["apiVersion"] == schema.api_version
    assert schema.errors(so) == []
    assert cel_problems(so) == []


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        (["spec", "triggers", 0, "metadta"], {}, "Additional properties"),
        (["spec", "minReplicaCount"], "2", "is not of type 'integer'"),
        (["spec", "triggers"], [], "should be non-empty"),
        (["spec", "scaleTargetRef", "nme"], "ferry", "Additional properties"),
    ],
)
def test_crd_validation_catches_mistakes(
    where: list[Any], value: Any, expected: str, stacked: dict[str, Any]
) -> None:
    so = copy.deepcopy(scaled_object(stacked["staging"]))
    parent = so
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    errors = crd(SCHEMA).errors(so)
    assert any(expected in e for e in errors), errors


def test_cel_and_admission_checks_can_fail(stacked: dict[str, Any]) -> None:
    so = copy.deepcopy(scaled_object(stacked["staging"]))
    so["spec"]["minReplicaCount"] = so["spec"]["maxReplicaCount"] + 1
    assert cel_problems(so) == ["minReplicaCount must be less than or equal to maxReplicaCount"]
    so = copy.deepcopy(scaled_object(stacked["staging"]))
    so["spec"]["triggers"][1]["name"] = so["spec"]["triggers"][0]["name"]
    del so["metadata"]["annotations"][TRANSFER_HPA]
    problems = admission_problems(so, [one("staging", "HorizontalPodAutoscaler")])
    assert problems == ["duplicate trigger names", "HPA ferry already scales ferry"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_keda_admits_it_and_takes_over_the_hpa_an_earlier_apply_left(
    env: str, stacked: dict[str, Any]
) -> None:
    assert admission_problems(scaled_object(stacked[env]), [one(env, "HorizontalPodAutoscaler")]) == []


# In place of the environment's HorizontalPodAutoscaler --------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_it_replaces_the_hpa_and_keeps_its_settings(env: str, stacked: dict[str, Any]) -> None:
    docs = stacked[env]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "two autoscalers would fight"
    hpa = one(env, "HorizontalPodAutoscaler")
    deployment = one(env, "Deployment")
    so = scaled_object(docs)
    target = so["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert so["metadata"]["namespace"] == deployment["metadata"]["namespace"] == f"ferry-{env}"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )
    config = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert config["behavior"] == hpa["spec"]["behavior"] and config["name"] == hpa["metadata"]["name"]
    others = [d for d in docs if d["kind"] != "ScaledObject"]
    assert others == [d for d in rendered(env) if d["kind"] != "HorizontalPodAutoscaler"], (
        "nothing else changes"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_per_pod_targets_are_the_hpa_s(env: str, stacked: dict[str, Any]) -> None:
    """Each trigger is a sum over the pods with an AverageValue target (the sum per replica), equal to
    the HPA's per-pod target for the same metric."""
    hpa_targets = {
        m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"])
        for m in one(env, "HorizontalPodAutoscaler")["spec"]["metrics"]
    }
    keda_targets = {}
    for trigger in scaled_object(stacked[env])["spec"]["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        (name,) = metric_names(trigger["metadata"]["query"])
        keda_targets[name] = float(trigger["metadata"]["threshold"])
    assert keda_targets == hpa_targets


def test_in_the_environment_s_own_components_it_fails_to_build(tmp_path: Path) -> None:
    """Listed in a kustomization that sets the namespace itself, the namespace is not there yet when the
    component runs: the build fails instead of rendering queries for no namespace."""
    code, text = render(DEPLOY / "base", tmp_path, namespace="ferry-staging")
    assert code != 0 and "metadata.namespace" in text, text


# The queries against Ferry's metrics ---------------------------------------------------------------------


def exported() -> dict[str, tuple[str, set[str]]]:
    """{family: (type, label names)} of a Ferry app's registry, as create_app registers it."""
    metrics = Metrics()
    create_app(Settings(), metrics)
    declared = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        labels = declared.get(family.name, set()) | {k for s in family.samples for k in s.labels}
        out[family.name + ("_total" if family.type == "counter" else "")] = (family.type, labels)
    return out


def query_problems(query: str, namespace: str, families: dict[str, tuple[str, set[str]]]) -> list[str]:
    """Why ``query`` would not give KEDA one number per environment from Ferry's series."""
    shape = re.fullmatch(r"sum\(([a-z_:][a-z0-9_:]*)\{([^{}]*)\}\)", query)
    if shape is None:
        return [f"{query}: not sum(metric{{matchers}}), one series for the whole environment"]
    name, matchers = shape.groups()
    if name not in families:
        return [f"{name} is not exported by Ferry"]
    kind, labels = families[name]
    problems = [] if kind == "gauge" else [f"{name} is a {kind}: a sum of it is no level"]
    if labels & TARGET_LABELS:
        problems.append(f"{name} has its own {labels & TARGET_LABELS}, renamed exported_* by Prometheus")
    selected = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
    for label in selected:
        if label not in labels | TARGET_LABELS:
            problems.append(f"{name} has no label {label}")
    if selected.get("namespace") != namespace:
        problems.append(f"{query} does not select namespace {namespace}")
    if selected.get("job") != "ferry":
        problems.append(f"{query} does not select job ferry")
    return problems


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_queries_read_gauges_ferry_exports_with_labels_it_has(env: str, stacked: dict[str, Any]) -> None:
    families = exported()
    for trigger in scaled_object(stacked[env])["spec"]["triggers"]:
        assert query_problems(trigger["metadata"]["query"], f"ferry-{env}", families) == []
    # job="ferry" is the ServiceMonitor's job label: the value of the Service label it names.
    monitor, service = one(env, "ServiceMonitor"), one(env, "Service")
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "ferry"


def test_in_flight_series_exist_before_any_traffic() -> None:
    """Why ignoreNullValues=false is safe: http_requests_inprogress has its series (0) as soon as the
    app's middleware is built, at start-up; ferry_queue_rows gets its own when a model loads."""
    metrics = Metrics()
    create_app(Settings(), metrics).build_middleware_stack()
    text = generate_latest(metrics.registry).decode()
    assert re.search(r"^http_requests_inprogress\{[^}]*\} 0\.0$", text, re.MULTILINE)


def test_the_query_check_can_fail() -> None:
    families = exported()
    assert query_problems('sum(ferry_queue_row{job="ferry",namespace="a"})', "a", families) == [
        "ferry_queue_row is not exported by Ferry"
    ]
    assert query_problems('ferry_queue_rows{job="ferry",namespace="a"}', "a", families) != []
    assert query_problems('sum(ferry_queue_rows{job="ferry",namespace="a",handler="x"})', "a", families) == [
        "ferry_queue_rows has no label handler"
    ]
    assert query_problems(
        'sum(ferry_inference_requests_total{job="ferry",namespace="a"})', "a", families
    ) == ["ferry_inference_requests_total is a counter: a sum of it is no level"]
    assert query_problems('sum(ferry_queue_rows{job="ferry",namespace="b"})', "a", families) == [
        'sum(ferry_queue_rows{job="ferry",namespace="b"}) does not select namespace a'
    ]


def test_queries_parse_as_promql(stacked: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule's expression); a broken one fails."""
    promtool = require_tool("promtool")
    queries = [
        t["metadata"]["query"] for so in map(scaled_object, stacked.values()) for t in so["spec"]["triggers"]
    ]
    for name, exprs in {"good": queries, "broken": ['sum(ferry_queue_rows{job="ferry"}']}.items():
        rules = tmp_path / f"{name}.yml"
        rules.write_text(
            yaml.safe_dump(
                {"groups": [{"name": "keda", "rules": [{"record": "keda:q", "expr": e} for e in exprs]}]}
            )
        )
        result = run_tool(promtool, "check", "rules", rules)
        assert (result.returncode == 0) == (name == "good"), result.stdout


# Trigger metadata as KEDA's Prometheus scaler reads it ------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_trigger_metadata_are_prometheus_scaler_fields(env: str, stacked: dict[str, Any]) -> None:
    monitoring = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in one(env, "NetworkPolicy")["spec"]["ingress"]
        for peer in rule["from"]
        if peer.get("namespaceSelector", {}).get("matchLabels")
    }
    for trigger in scaled_object(stacked[env])["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert PROMETHEUS_REQUIRED <= set(meta) <= PROMETHEUS_FIELDS, set(meta) ^ PROMETHEUS_FIELDS
        assert all(isinstance(v, str) for v in meta.values()), "metadata values are strings"
        assert float(meta["threshold"]) > 0
        assert meta.get("ignoreNullValues", "true") in GO_BOOLS
        assert meta["ignoreNullValues"].lower() == "false", "an empty answer is an error, not 0"
        server = urlparse(meta["serverAddress"])
        assert server.scheme in ("http", "https") and server.port == 9090
        host = (server.hostname or "").split(".")
        assert host[0] == "prometheus-operated" and {host[1]} == monitoring, (
            "Prometheus of the monitoring namespace"
        )


# Documented --------------------------------------------------------------------------------------------------


def test_readme_documents_autoscaling_on_queue_depth(stacked: dict[str, Any]) -> None:
    text = README.read_text()
    match = re.search(r"\*\*Autoscaling on queue depth\*\*(.*?)(?=\n- \*\*|\n#)", text, re.DOTALL)
    assert match, "README has no 'Autoscaling on queue depth' note"
    note = " ".join(match[1].split())
    assert "`deploy/components/keda`" in note
    for trigger in scaled_object(stacked["production"])["spec"]["triggers"]:
        (name,) = metric_names(trigger["metadata"]["query"])
        assert f"`{name}`" in note, f"the note does not name {name}"
        assert re.search(rf"^\| [^|]*`{name}`[^|]*\| gauge \|", text, re.MULTILINE), f"{name}: metrics table"
