"""The Kubernetes manifests, rendered by Kustomize itself and checked offline: kubernetes-validate
--strict against current Kubernetes versions, then the properties a safe rollout depends on."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from delivery_support import (
    ADAPTER_VALUES,
    DELIVERY_DOC,
    OVERLAYS,
    ROOT,
    UID,
    container,
    one,
    rendered,
    resources,
    selector_matches,
    settings_from,
)
from service.api.app import create_app, create_ops_app, route_table
from service.config import Settings

ENVIRONMENTS = sorted(OVERLAYS)
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
"""The oldest Kubernetes still in upstream support when this was written, and the newest schemas the
installed kubernetes-validate carries."""
README = ROOT / "README.md"
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Kinds without a schema in kubernetes-validate (CRDs); test_service_monitor checks them instead."""


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_rendered_resource_validates_strictly(env: str, version: str) -> None:
    kinds = set()
    for doc in rendered(env):
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert {"ServiceAccount", "ServiceMonitor"} <= kinds


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validation above can fail: a misspelt field is an error, not silently dropped."""
    deployment = copy.deepcopy(one("staging", "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_namespace_matches_the_deploy_workflow(env: str) -> None:
    """deploy.yml and rollback.yml act on namespace ferry-<environment>."""
    assert {doc["metadata"].get("namespace") for doc in rendered(env)} == {f"ferry-{env}"}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_rolling_update_never_drops_below_capacity(env: str) -> None:
    spec = one(env, "Deployment")["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"
    assert spec["revisionHistoryLimit"] >= 5, "rollback.yml needs revisions to go back to"


def _http_probe(probe: dict[str, Any]) -> tuple[str, str]:
    return probe["httpGet"]["path"], probe["httpGet"]["port"]


PROBES = {"startupProbe": "/health/ready", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
"""Start-up waits for the models (liveness checks begin only once they are loaded and warmed up, so slow
loading never restarts a pod); readiness follows them and shutdown; liveness is only "the process
answers", so a failed reload never restarts a pod that serves the old version."""
_DOC_PROBES = re.compile(r"start-up and readiness on `(/[^`]+)`, liveness on `(/[^`]+)`", re.IGNORECASE)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_probes_use_ferrys_health_routes(env: str) -> None:
    c = container(env)
    assert {probe: _http_probe(c[probe])[0] for probe in PROBES} == PROBES
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (600 if env == "production" else 300), "time to load and warm up every model"


def _health_port_problems(env: str, settings: Settings) -> list[str]:
    """Where a probe or the ServiceMonitor would miss the listener that serves the health routes and
    /metrics: the main port, or FERRY_METRICS_PORT's own (``create_ops_app``) when that is set."""
    app = create_app(settings)
    ops_port = settings.metrics_port if settings.metrics_port is not None else settings.port
    served = route_table(create_ops_app(app) if settings.metrics_port is not None else app)
    c = container(env)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    problems = []
    for probe in PROBES:
        path, port = _http_probe(c[probe])
        if ports.get(port, port) != ops_port:
            problems.append(f"{probe} on port {port}, but {path} is served on {ops_port}")
        if path not in served:
            problems.append(f"{probe}: {path} is not served on port {ops_port}")
    targets = {p["name"]: p["targetPort"] for p in one(env, "Service")["spec"]["ports"]}
    for endpoint in one(env, "ServiceMonitor")["spec"]["endpoints"]:
        target = targets.get(endpoint["port"])
        if ports.get(target, target) != ops_port:
            problems.append(f"ServiceMonitor scrapes port {endpoint['port']}, /metrics is on {ops_port}")
    return problems


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_probes_reach_the_port_that_serves_health(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _health_port_problems(env, _settings(env, monkeypatch)) == []


def test_health_port_check_sees_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifests set FERRY_METRICS_PORT and probe and scrape port `metrics`: without the setting the
    health routes stay on the main port, and the check must see the probes and the scrape miss them."""
    settings = _settings("staging", monkeypatch)
    assert settings.metrics_port == 9100
    problems = _health_port_problems("staging", settings.model_copy(update={"metrics_port": None}))
    assert any("startupProbe on port metrics" in p for p in problems), problems
    assert any("ServiceMonitor scrapes port metrics" in p for p in problems), problems


def test_the_network_policy_opens_inference_to_the_cluster_and_metrics_to_monitoring_only() -> None:
    for env in ENVIRONMENTS:
        policy = one(env, "NetworkPolicy")["spec"]
        pods = one(env, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert all(pods.get(k) == v for k, v in policy["podSelector"]["matchLabels"].items())
        assert policy["policyTypes"] == ["Ingress"]
        by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
        assert set(by_port) == {"http", "metrics"}
        assert by_port["metrics"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
        names = {p["name"] for p in container(env)["ports"]}
        assert names == {"http", "metrics"}


def test_inference_needs_an_api_key_from_the_secret() -> None:
    for env in ENVIRONMENTS:
        variables = {e["name"]: e for e in container(env).get("env", [])}
        ref = variables["FERRY_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "ferry-secrets" and ref["key"] == "api-keys" and not ref.get("optional")


@pytest.mark.parametrize("doc", [README, DELIVERY_DOC], ids=lambda p: p.name)
def test_docs_state_the_probes_the_manifests_use(doc: Path) -> None:
    """README and docs/delivery.md say "start-up and readiness on `X`, liveness on `Y`", as deployed."""
    found = _DOC_PROBES.findall(" ".join(doc.read_text().split()))
    assert found, f"{doc.name} does not say which paths the probes use"
    deployed = {
        (
            _http_probe(c["startupProbe"])[0],
            _http_probe(c["readinessProbe"])[0],
            _http_probe(c["livenessProbe"])[0],
        )
        for c in map(container, ENVIRONMENTS)
    }
    for ready, live in found:
        assert {(ready, ready, live)} == deployed, f"{doc.name} says {ready}, {live}; deployed: {deployed}"


def _settings(env: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the pod would get from its ConfigMap and literal env (secrets aside)."""
    config = next(
        cm["data"] for cm in resources(env, "ConfigMap") if cm["metadata"]["name"].startswith("ferry-config")
    )
    literal = {e["name"]: e["value"] for e in container(env).get("env", []) if "value" in e}
    return settings_from({**config, **literal}, monkeypatch)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_shutdown_budget_fits_the_termination_grace_period(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """preStop pause (endpoints drop the pod while it still serves) + Ferry's own grace period after
    SIGTERM (readiness 503, still serving) + the longest in-flight request must end before SIGKILL."""
    pod = one(env, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(env)["lifecycle"]["preStop"]["sleep"]["seconds"]
    settings = _settings(env, monkeypatch)
    readiness = container(env)["readinessProbe"]
    assert pre_stop >= readiness["periodSeconds"], "long enough for endpoints to notice"
    budget = pre_stop + settings.shutdown.grace_s + settings.batch.timeout_ms / 1000
    assert pod["terminationGracePeriodSeconds"] >= budget + 5, budget


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_runs_non_root_on_a_read_only_root_filesystem(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pod = one(env, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID and pod["securityContext"]["runAsGroup"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container(env)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container(env)["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts.values()) <= volumes
    settings = _settings(env, monkeypatch)
    assert "/tmp" in mounts, "MLflow and torch write temporary files"
    assert any(settings.download_dir.startswith(path) for path in mounts), (
        "models are downloaded somewhere writable"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_resources_and_gpu_only_in_limits(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    res = container(env)["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    assert "nvidia.com/gpu" not in res["requests"], "GPUs go in limits only"
    gpu = res["limits"].get("nvidia.com/gpu")
    settings = _settings(env, monkeypatch)
    if env == "production":
        assert gpu == 1 and settings.device == "cuda" and container(env)["image"] == "ferry-gpu"
        tolerations = one(env, "Deployment")["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpu is None and settings.device == "cpu" and container(env)["image"] == "ferry"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_image_is_a_placeholder_until_the_deploy_pins_a_digest(env: str) -> None:
    image = container(env)["image"]
    assert image in ("ferry", "ferry-gpu") or "@sha256:" in image, image


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_service_pdb_and_hpa_point_at_the_pods(env: str) -> None:
    deployment = one(env, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector_matches(selector, pod_labels)
    service = one(env, "Service")
    assert selector_matches(service["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in container(env)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    pdb = one(env, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    hpa = one(env, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= (2 if env == "production" else 1)


def test_selector_check_catches_a_mismatch() -> None:
    assert not selector_matches({"app.kubernetes.io/name": "ferry"}, {"app.kubernetes.io/name": "other"})
    assert not selector_matches({}, {"app.kubernetes.io/name": "ferry"}), "an empty selector matches all"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_hpa_scales_on_ferry_metrics_served_by_the_adapter(env: str) -> None:
    hpa = one(env, "HorizontalPodAutoscaler")
    metrics = hpa["spec"]["metrics"]
    assert all(m["type"] == "Pods" for m in metrics), "queue depth or in-flight requests, not CPU"
    names = {m["pods"]["metric"]["name"] for m in metrics}
    assert names == {"ferry_queue_rows", "http_requests_inprogress"}
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert names <= {r["name"]["as"] for r in rules}
    for rule in rules:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_service_monitor_scrapes_the_service(env: str) -> None:
    monitor = one(env, "ServiceMonitor")
    service = one(env, "Service")
    labels = service["metadata"]["labels"]
    assert selector_matches(monitor["spec"]["selector"]["matchLabels"], labels)
    assert set(monitor["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    # The rules and dashboards select job="ferry": the job label comes from this Service label.
    assert labels[monitor["spec"]["jobLabel"]] == "ferry"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_config_and_secret_references_resolve_or_are_documented(env: str) -> None:
    c = container(env)
    config_maps = {cm["metadata"]["name"] for cm in resources(env, "ConfigMap")}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] in config_maps
    doc = DELIVERY_DOC.read_text()
    secret_keys = [
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert secret_keys, "Redis and MLflow credentials come from a Secret"
    for name, key in secret_keys:
        assert f"`{name}`" in doc and f"`{key}`" in doc, (
            f"docs/delivery.md must say how to create {name}/{key}"
        )
