"""Ferry on KServe (deploy/kserve/), checked offline and on this machine:

- the ClusterServingRuntime, ClusterStorageContainer and example InferenceService validate against
  KServe v0.20.0's CRDs (tests/data/kserve-v0.20.0, as JSON Schemas: ``crd_support``), and the pods KServe
  would build from them against Kubernetes' own schemas (kubernetes-validate, strict);
- KServe's runtime selection and its admission rules (transcribed from KServe v0.20.0's Go code:
  ``pkg/apis/serving/v1beta1/predictor_model.go``, ``pkg/webhook/admission/servingruntime``) pick Ferry
  for ``mlflow`` models over the stock MLServer runtime kept beside the CRDs;
- the runtime stays in step with Ferry: its env names are settings, its port is the port Ferry listens
  on, its probes and scrape path are routes Ferry serves there, and ``{{.Name}}=/mnt/models`` is a model
  entry Ferry accepts, named after the InferenceService;
- ``ferry fetch-model`` (the storage initializer) downloads from a real MLflow registry (sqlite), and a
  Ferry started as the serving container then answers ``/v2/models/{name}/infer``.

What only a cluster can show (a KServe install, Knative or raw deployment mode, the webhook's merge of
the InferenceService into the runtime) is listed in the README's "Running on KServe".
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import numpy as np
import procs
import pytest
import tritonclient.grpc
import yaml
from crd_support import KSERVE, crd, manifests

from conftest import Registry, free_port, stop_server
from delivery_support import is_setting, kustomize_command, run, settings_from
from service.api.app import create_app, route_table
from service.config import Settings
from service.registry import _MODELS_URI, _RUNS_URI, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_KSERVE = ROOT / "deploy" / "kserve"
RUNTIME_FILE = DEPLOY_KSERVE / "clusterservingruntime.yaml"
STORAGE_FILE = DEPLOY_KSERVE / "clusterstoragecontainer.yaml"
ISVC_FILE = DEPLOY_KSERVE / "inferenceservice.yaml"
GRPC_ISVC_FILE = DEPLOY_KSERVE / "inferenceservice-grpc.yaml"
STOCK_MLSERVER = KSERVE / "kserve-mlserver.yaml"
STOCK_STORAGE = KSERVE / "storagecontainer-default.yaml"
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]

# Facts of KServe v0.20.0 (pkg/constants/constants.go, pkg/apis/serving/v1beta1/*validation.go).
MODEL_MOUNT = "/mnt/models"
"""DefaultModelLocalMountPath: where the storage initializer puts the model."""
PREDICTOR_CONTAINER = "kserve-container"
STORAGE_CONTAINER = "storage-initializer"
DEFAULT_HTTP_PORT = 8080
"""InferenceServiceDefaultHttpPort."""
GRPC_PORT = 8081
"""The gRPC (h2c) port of KServe's own model servers (``--grpc_port``'s default, its gRPC docs' examples)."""
RAW_DEPLOYMENT = {"serving.kserve.io/deploymentMode": "RawDeployment"}
"""The annotation of KServe's RawDeployment mode (plain Deployments: no Knative, any number of ports)."""
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""IsvcNameFmt."""
BLOCKED_ENV = {"PYTHONPATH"}
"""validation.DefaultBlockedEnvVars."""
KNATIVE_PORT_NAMES = {"http1", "h2c"}
"""Knative Serving's port names (HTTP/1.1, HTTP/2 cleartext); it allows one port per container."""

CRDS = {
    "ClusterServingRuntime": KSERVE / "serving.kserve.io_clusterservingruntimes.yaml",
    "ClusterStorageContainer": KSERVE / "serving.kserve.io_clusterstoragecontainers.yaml",
    "InferenceService": KSERVE / "serving.kserve.io_inferenceservices.yaml.gz",
}


def one_doc(path: Path) -> dict[str, Any]:
    (doc,) = manifests(path)
    return doc


def runtime() -> dict[str, Any]:
    return one_doc(RUNTIME_FILE)


def runtime_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = runtime()["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == PREDICTOR_CONTAINER]
    return container


def isvc_model() -> dict[str, Any]:
    return dict(one_doc(ISVC_FILE)["spec"]["predictor"]["model"])


# The manifests against KServe's CRDs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [RUNTIME_FILE, STORAGE_FILE, ISVC_FILE, GRPC_ISVC_FILE, STOCK_MLSERVER, STOCK_STORAGE],
    ids=lambda p: p.name,
)
def test_manifests_validate_against_kserve_crds(path: Path) -> None:
    """Ferry's manifests, and KServe's own stock ones (so the conversion is known to accept them)."""
    for doc in manifests(path):
        schema = crd(CRDS[doc["kind"]])
        assert doc["apiVersion"] == schema.api_version
        assert schema.errors(doc) == []
        assert not schema.rules, "a CEL rule this test does not check by hand"


@pytest.mark.parametrize(
    ("path", "where", "value", "expected"),
    [
        (RUNTIME_FILE, ["spec", "supportedModelFormat"], [], "Additional properties"),
        (RUNTIME_FILE, ["spec", "supportedModelFormats", 0, "priority"], "2", "is not of type 'integer'"),
        (RUNTIME_FILE, ["spec", "containers", 0, "livenessProbes"], {}, "Additional properties"),
        (RUNTIME_FILE, ["spec", "containers", 0, "ports", 0, "containerPort"], "8080", "not of type"),
        (STORAGE_FILE, ["spec", "supportedUriFormats", 0, "prefixes"], "models:/", "Additional properties"),
        (STORAGE_FILE, ["spec", "container", "command"], "ferry fetch-model", "is not of type 'array'"),
        (ISVC_FILE, ["spec", "predictor", "model", "storageURI"], "models:/x@y", "Additional properties"),
        (ISVC_FILE, ["kind"], "InferenceServices", "is not one of"),
    ],
)
def test_crd_validation_catches_mistakes(path: Path, where: list[Any], value: Any, expected: str) -> None:
    """The validation above can fail: a misspelt field, a wrong type, a wrong kind are errors."""
    doc = copy.deepcopy(one_doc(path))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    errors = crd(CRDS[one_doc(path)["kind"]]).errors(doc)
    assert any(expected in e for e in errors), errors


# KServe's choice of runtime --------------------------------------------------------------------------


def _labels(runtime_spec: dict[str, Any], model: dict[str, Any]) -> set[str]:
    """getServingRuntimeSupportedModelFormatLabelSet: formats count when auto-selectable, or all of
    them when the InferenceService names its runtime."""
    out = set()
    for fmt in runtime_spec["supportedModelFormats"]:
        if model.get("runtime") or fmt.get("autoSelect"):
            out.add(f"mt:{fmt['name']}")
            if "version" in fmt:
                out.add(f"mt:{fmt['name']}:{fmt['version']}")
    return out


def _priority(runtime_spec: dict[str, Any], name: str) -> int | None:
    """GetPriority: the priority of the first supported format of that name, whatever its version."""
    return next((f.get("priority") for f in runtime_spec["supportedModelFormats"] if f["name"] == name), None)


def supporting_runtimes(runtimes: list[dict[str, Any]], model: dict[str, Any]) -> list[str]:
    """GetSupportingRuntimes for cluster runtimes and a single-model InferenceService: the runtimes that
    take the model's format label and protocol (v1 when it states none), highest priority first; KServe
    uses the first."""
    fmt = model["modelFormat"]
    label = f"mt:{fmt['name']}" + (f":{fmt['version']}" if "version" in fmt else "")
    protocol = model.get("protocolVersion", "v1")
    found = []
    for rt in runtimes:
        spec = rt["spec"]
        if spec.get("disabled") or spec.get("multiModel") or "workerSpec" in spec:
            continue
        protocols = spec.get("protocolVersions") or []
        if label in _labels(spec, model) and (not protocols or protocol in protocols):
            found.append(rt)
    found.sort(key=lambda rt: (p := _priority(rt["spec"], fmt["name"])) is None or -p)
    return [rt["metadata"]["name"] for rt in found]


def admission_problems(new: dict[str, Any], existing: list[dict[str, Any]]) -> list[str]:
    """What KServe's ClusterServingRuntime webhook denies: one format at two priorities in one runtime
    (validateModelFormatPrioritySame), or the same auto-selected format and version at the same priority
    as another runtime sharing a protocol (validateServingRuntimePriority); blocked env names."""
    problems = []
    spec = new["spec"]
    seen: dict[str, int | None] = {}
    for fmt in spec["supportedModelFormats"]:
        if fmt.get("autoSelect"):
            before = seen.setdefault(fmt["name"], fmt.get("priority"))
            if None not in (before, fmt.get("priority")) and before != fmt.get("priority"):
                problems.append(f"{fmt['name']} has two priorities")
    for other in existing:
        theirs = other["spec"]
        if not set(theirs.get("protocolVersions", [])) & set(spec.get("protocolVersions", [])):
            continue
        for a in theirs["supportedModelFormats"]:
            for b in spec["supportedModelFormats"]:
                same = a["name"].lower() == b["name"].lower() and a.get("version") == b.get("version")
                both = same and a.get("autoSelect") and b.get("autoSelect")
                if (
                    both
                    and None not in (a.get("priority"), b.get("priority"))
                    and a["priority"] == b["priority"]
                ):
                    problems.append(
                        f"{b['name']} {b.get('version')}: same priority as {other['metadata']['name']}"
                    )
    for container in spec["containers"]:
        problems += [f"blocked env {e['name']}" for e in container.get("env", []) if e["name"] in BLOCKED_ENV]
    return problems


def test_kserve_picks_ferry_for_the_example_and_for_mlflow_2_and_3() -> None:
    runtimes = [one_doc(STOCK_MLSERVER), runtime()]
    model = isvc_model()
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"
    assert supporting_runtimes(runtimes, model) == ["ferry", "kserve-mlserver"]
    versioned = {
        v: supporting_runtimes(runtimes, {**model, "modelFormat": {"name": "mlflow", "version": v}})
        for v in "123"
    }
    assert versioned == {"1": ["kserve-mlserver"], "2": ["ferry", "kserve-mlserver"], "3": ["ferry"]}
    stock = _priority(one_doc(STOCK_MLSERVER)["spec"], "mlflow")
    assert stock is not None and _priority(runtime()["spec"], "mlflow") == stock + 1


def test_the_choice_emulation_can_say_no() -> None:
    """Without protocolVersion an InferenceService asks for v1, which neither runtime serves; a runtime
    whose format is not auto-selectable is chosen only by name."""
    runtimes = [one_doc(STOCK_MLSERVER), runtime()]
    model = isvc_model()
    assert supporting_runtimes(runtimes, {k: v for k, v in model.items() if k != "protocolVersion"}) == []
    manual = copy.deepcopy(runtime())
    for fmt in manual["spec"]["supportedModelFormats"]:
        fmt["autoSelect"] = False
    assert supporting_runtimes([manual], model) == []
    assert supporting_runtimes([manual], {**model, "runtime": "ferry"}) == ["ferry"]


def test_kserve_admits_the_runtime_beside_the_stock_one() -> None:
    assert admission_problems(runtime(), [one_doc(STOCK_MLSERVER)]) == []
    clash = copy.deepcopy(runtime())
    for fmt in clash["spec"]["supportedModelFormats"]:
        fmt["priority"] = 1
    clash["spec"]["supportedModelFormats"][0]["version"] = "2"
    assert admission_problems(clash, [one_doc(STOCK_MLSERVER)]) == [
        "mlflow 2: same priority as kserve-mlserver"
    ]
    clash["spec"]["supportedModelFormats"][1]["priority"] = 3
    assert "mlflow has two priorities" in admission_problems(clash, [])


def merged_ports(
    runtime_ports: list[dict[str, Any]], isvc_ports: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """MergeRuntimeContainers' strategic merge of ``ports`` (patch merge key ``containerPort``): the
    runtime's ports, each updated by the InferenceService's port of the same number, then its others."""
    by_port = {p["containerPort"]: dict(p) for p in runtime_ports}
    for port in isvc_ports:
        by_port.setdefault(port["containerPort"], {}).update(port)
    return list(by_port.values())


def test_grpc_v2_is_claimed_with_the_grpc_port_ferry_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime claims grpc-v2 because every pod serves gRPC on FERRY_GRPC_PORT (KServe's 8081); the gRPC
    example adds that port as h2c, in RawDeployment (Knative's one port stays http1 for REST)."""
    protocols = runtime()["spec"]["protocolVersions"]
    assert protocols == ["v2", "grpc-v2"]
    assert is_setting("FERRY_GRPC_PORT")
    settings = runtime_settings("fraud-grpc", monkeypatch)
    assert settings.grpc_port == GRPC_PORT != settings.port
    doc = one_doc(GRPC_ISVC_FILE)
    model = dict(doc["spec"]["predictor"]["model"])
    assert model["protocolVersion"] == "grpc-v2" and model["modelFormat"] == isvc_model()["modelFormat"]
    assert doc["metadata"]["annotations"] == RAW_DEPLOYMENT, "two ports: Knative would refuse the pod"
    runtimes = [one_doc(STOCK_MLSERVER), runtime()]
    assert supporting_runtimes(runtimes, model) == ["ferry"], "MLServer's runtime claims v2 only"
    ports = merged_ports(runtime_container()["ports"], model["ports"])
    assert {p["name"]: p["containerPort"] for p in ports} == {
        "http1": settings.port,
        "h2c": settings.grpc_port,
    }
    assert all(p["name"] in KNATIVE_PORT_NAMES and p.get("protocol", "TCP") == "TCP" for p in ports)


def test_the_port_merge_emulation_can_say_no() -> None:
    """A port of the same number is updated, not added: an h2c port on 8080 would turn REST's into gRPC's."""
    runtime_ports = [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert merged_ports(runtime_ports, [{"name": "h2c", "containerPort": 8080}]) == [
        {"name": "h2c", "containerPort": 8080, "protocol": "TCP"}
    ]


# The runtime in step with Ferry's settings and routes -----------------------------------------------


def render_placeholders(container: dict[str, Any], name: str, namespace: str = "models") -> dict[str, Any]:
    """ReplacePlaceholders: KServe runs Go's text/template over the container's JSON with the
    InferenceService's ObjectMeta; this knows ``{{.Name}}`` and ``{{.Namespace}}`` and fails on others."""
    text = json.dumps(container)
    fields = {"Name": name, "Namespace": namespace}
    text = re.sub(r"\{\{\s*\.(Name|Namespace)\s*\}\}", lambda m: fields[m[1]], text)
    assert "{{" not in text, f"a template this test does not render: {text}"
    rendered: dict[str, Any] = json.loads(text)
    return rendered


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def runtime_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings: Settings = settings_from(
        container_env(render_placeholders(runtime_container(), name)), monkeypatch
    )
    return settings


def _mlflow_variable(name: str) -> bool:
    import mlflow.environment_variables

    return hasattr(mlflow.environment_variables, name)


@pytest.mark.parametrize("container", ["runtime", "storage"])
def test_env_names_are_ferry_settings_or_mlflow_variables(container: str) -> None:
    c = runtime_container() if container == "runtime" else one_doc(STORAGE_FILE)["spec"]["container"]
    for env in c["env"]:
        name = env["name"]
        assert name not in BLOCKED_ENV, f"KServe refuses {name}"
        if name.startswith("FERRY_"):
            assert is_setting(name), f"{name} is not a Ferry setting"
        else:
            assert name.startswith("MLFLOW_") and _mlflow_variable(name), (
                f"{name}: neither Ferry's nor MLflow's"
            )


def test_runtime_serves_the_inference_service_s_model_on_kserve_s_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    container = runtime_container()
    settings = runtime_settings("fraud", monkeypatch)
    (port,) = container["ports"]  # Knative: one port
    assert port["name"] in KNATIVE_PORT_NAMES and port["name"] == "http1"
    assert port["containerPort"] == settings.port == DEFAULT_HTTP_PORT
    assert settings.host == "0.0.0.0"
    assert settings.metrics_port is None, "health and /metrics must stay on the one port Knative allows"
    assert int(runtime()["spec"]["annotations"]["prometheus.kserve.io/port"]) == settings.port
    assert settings.reload.poll_s == 0
    (entry,) = settings.models
    assert ModelSpec.parse(entry) == ModelSpec(name="fraud", uri=MODEL_MOUNT)
    assert container["command"] == ["ferry", "serve"] and "args" not in container, (
        "the image's CMD sets --port"
    )


def test_probes_and_scrape_hit_routes_ferry_serves_on_that_port(monkeypatch: pytest.MonkeyPatch) -> None:
    container = runtime_container()
    settings = runtime_settings("fraud", monkeypatch)
    served = route_table(create_app(settings))
    probes = {
        p: (container[p]["httpGet"]["path"], container[p]["httpGet"]["port"])
        for p in ("readinessProbe", "livenessProbe")
    }
    assert probes == {
        "readinessProbe": ("/health/ready", settings.port),
        "livenessProbe": ("/health/live", settings.port),
    }
    assert "startupProbe" not in container, "/health/live answers while the model loads"
    scrape = runtime()["spec"]["annotations"]["prometheus.kserve.io/path"]
    for path in (*(p for p, _ in probes.values()), scrape):
        assert "GET" in served.get(path, set()), f"{path} is not served on port {settings.port}"


def test_ferry_s_probes_check_would_catch_a_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FERRY_METRICS_PORT the health routes leave the serving port: the route check above sees it."""
    settings = runtime_settings("fraud", monkeypatch).model_copy(update={"metrics_port": 9100})
    assert "/health/ready" not in route_table(create_app(settings))


@pytest.mark.parametrize("name", ["fraud", "a", "fraud-detector-2", "x" * 63])
def test_any_inference_service_name_is_a_model_name_ferry_takes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ISVC_NAME.match(name)
    (entry,) = runtime_settings(name, monkeypatch).models
    assert ModelSpec.parse(entry) == ModelSpec(name=name, uri=MODEL_MOUNT)


def test_the_example_is_a_valid_inference_service_name_and_registry_uri() -> None:
    isvc = one_doc(ISVC_FILE)
    assert ISVC_NAME.match(isvc["metadata"]["name"])
    assert _MODELS_URI.match(isvc_model()["storageUri"])


def kserve_section() -> str:
    """README's "Running on KServe", up to the next heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^### Running on KServe\n(.*?)(?=^#)", text, re.MULTILINE | re.DOTALL)
    assert match, "README has no 'Running on KServe' section"
    return match[1]


def test_every_ferry_name_in_the_kserve_files_and_docs_is_a_setting() -> None:
    """Comments and the README's section included, so that neither drifts from Settings."""
    texts = {p.name: p.read_text() for p in sorted(DEPLOY_KSERVE.glob("*.yaml"))}
    texts["README.md"] = kserve_section()
    for where, text in texts.items():
        for name in set(re.findall(r"\b(FERRY_[A-Z0-9_]+)\b", text)):
            assert is_setting(name), f"{where}: {name} is not a Ferry setting"


def test_readme_says_what_the_runtime_does(monkeypatch: pytest.MonkeyPatch) -> None:
    section = " ".join(kserve_section().split())
    settings = runtime_settings("fraud", monkeypatch)
    model = isvc_model()
    for fact in (
        f"`{runtime()['metadata']['name']}`",
        f"`{one_doc(STORAGE_FILE)['metadata']['name']}`",
        f"`FERRY_MODELS={container_env(runtime_container())['FERRY_MODELS']}`",
        f"`ferry fetch-model {model['storageUri']} {MODEL_MOUNT}`",
        f"{settings.port}",
        "`/health/ready`",
        "`/health/live`",
        "`grpc-v2`",
        f"{GRPC_PORT}",
        "`deploy/kserve/inferenceservice-grpc.yaml`",
        f"`protocolVersion: {model['protocolVersion']}`",
    ):
        assert fact in section, f"README's KServe section does not say {fact}"


# The storage initializer ------------------------------------------------------------------------------


def claims(storage: dict[str, Any], uri: str) -> bool:
    """IsStorageUriSupported: a prefix, or a regex matched anywhere (Go's regexp.MatchString)."""
    return any(
        uri.startswith(f["prefix"]) if f.get("prefix") else re.search(f["regex"], uri) is not None
        for f in storage["spec"]["supportedUriFormats"]
    )


def storage_init_container(storage_uri: str) -> dict[str, Any]:
    """The init container KServe's webhook builds (CreateInitContainerWithConfig: its image and the
    arguments SRC DEST), patched with the ClusterStorageContainer's container (MergeContainerWithPatch,
    a strategic merge: fields replace, env merges by name)."""
    base: dict[str, Any] = {
        "name": STORAGE_CONTAINER,
        "image": "kserve/storage-initializer:v0.20.0",
        "args": [storage_uri, MODEL_MOUNT],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {
            "requests": {"cpu": "100m", "memory": "100Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
    }
    patch = one_doc(STORAGE_FILE)["spec"]["container"]
    merged = {**base, **{k: v for k, v in patch.items() if k not in ("env", "resources")}}
    merged["resources"] = {
        k: {**base["resources"].get(k, {}), **v} for k, v in patch.get("resources", {}).items()
    }
    env = {e["name"]: e for e in base.get("env", [])} | {e["name"]: e for e in patch.get("env", [])}
    merged["env"] = list(env.values())
    return merged


def test_storage_container_claims_the_registry_uris_ferry_resolves() -> None:
    ours, stock = one_doc(STORAGE_FILE), one_doc(STOCK_STORAGE)
    spec = ours["spec"]
    assert spec["workloadType"] == "initContainer", "KServe only uses init-container storage containers"
    for uri in (isvc_model()["storageUri"], "models:/fraud/3", "runs:/0123abcd/model"):
        assert claims(ours, uri) and not claims(stock, uri), uri
        assert _MODELS_URI.match(uri) or _RUNS_URI.match(uri), f"Ferry's registry does not resolve {uri}"
    for uri in ("s3://bucket/model", "gs://bucket/model", "https://host/model.tar.gz", "pvc://claim/model"):
        assert not claims(ours, uri), f"{uri} is KServe's own storage initializer's"
    assert spec["container"]["name"] == STORAGE_CONTAINER
    assert "args" not in spec["container"], "args would replace the SRC DEST arguments KServe passes"


def test_storage_init_container_runs_ferry_fetch_model_with_kserve_s_arguments() -> None:
    init = storage_init_container(isvc_model()["storageUri"])
    assert init["command"] + init["args"] == ["ferry", "fetch-model", "models:/fraud@champion", MODEL_MOUNT]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^ferry = "service\.cli:main"$', pyproject, re.MULTILINE), "the image's `ferry` command"
    help_text = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "fetch-model" in help_text and "serve" in help_text


def kserve_pod(name: str, storage_uri: str) -> dict[str, Any]:
    """The predictor pod KServe would build for an InferenceService: the storage init container and the
    runtime's container, sharing the model volume (emptyDir), read-only in the server."""
    volume = "kserve-provision-location"
    init = storage_init_container(storage_uri)
    init["volumeMounts"] = [{"name": volume, "mountPath": MODEL_MOUNT}]
    server = render_placeholders(runtime_container(), name)
    server["volumeMounts"] = [{"name": volume, "mountPath": MODEL_MOUNT, "readOnly": True}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-predictor"},
        "spec": {
            "initContainers": [init],
            "containers": [server],
            "volumes": [{"name": volume, "emptyDir": {}}],
        },
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_pod_kserve_builds_validates_strictly(version: str) -> None:
    pod = kserve_pod(one_doc(ISVC_FILE)["metadata"]["name"], isvc_model()["storageUri"])
    kubernetes_validate.validate(pod, version, strict=True)
    broken = copy.deepcopy(pod)
    broken["spec"]["initContainers"][0]["env"][1]["valueFrom"]["secretKeyRef"]["optionl"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kustomize_pins_every_image(tmp_path: Path) -> None:
    """`kustomize edit set image ferry=...` reaches the runtime's container and the storage container's."""
    digest = "registry.example/ferry@sha256:" + "0" * 64
    overlay = tmp_path / "pinned"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(DEPLOY_KSERVE, overlay)],
                "images": [
                    {"name": "ferry", "newName": "registry.example/ferry", "digest": "sha256:" + "0" * 64}
                ],
            }
        )
    )
    result = run(*kustomize_command(), overlay)
    assert result.returncode == 0, result.stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(result.stdout) if d}
    assert set(docs) == {"ClusterServingRuntime", "ClusterStorageContainer"}
    assert [c["image"] for c in docs["ClusterServingRuntime"]["spec"]["containers"]] == [digest]
    assert docs["ClusterStorageContainer"]["spec"]["container"]["image"] == digest
    unpinned = run(*kustomize_command(), DEPLOY_KSERVE)
    assert unpinned.returncode == 0 and "image: ferry\n" in unpinned.stdout


# On this machine: the init container, then the server -----------------------------------------------


def fetch_model(registry: Registry, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``ferry fetch-model ARGS`` as KServe's init container runs it: arguments only, the registry in
    ``MLFLOW_TRACKING_URI``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "service", "fetch-model", *map(str, args)],
        env=env | registry.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_fetch_model_downloads_the_aliased_version_into_the_folder(
    registry: Registry, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    expected = MlflowClient(registry.tracking_uri).get_model_version_by_alias("linear", "champion").version
    dest = tmp_path / "mnt" / "models"
    done = fetch_model(registry, "models:/linear@champion", dest)
    assert done.returncode == 0, done.stderr
    assert f"models:/linear/{expected}" in done.stdout
    assert (dest / "MLmodel").is_file(), sorted(p.name for p in dest.iterdir())
    assert "model_version: '" + str(expected) + "'" in (dest / "registered_model_meta").read_text()
    assert not list(dest.glob(".ferry-fetch-*")), "the staging folder is gone"
    again = fetch_model(registry, "models:/linear@champion", dest)
    assert again.returncode == 0 and "already holds" in again.stdout, "an init container may run again"


def test_fetch_model_takes_pairs_as_kserve_passes_them(registry: Registry, tmp_path: Path) -> None:
    """KServe's multi-URI storage initializer arguments: SRC DEST SRC DEST."""
    done = fetch_model(
        registry, "models:/linear-onnx@champion", tmp_path / "a", "models:/linear/2", tmp_path / "b"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "MLmodel").is_file() and (tmp_path / "b" / "MLmodel").is_file()
    assert "onnx" in (tmp_path / "a" / "MLmodel").read_text()


def test_fetch_model_fails_loudly_and_leaves_nothing(registry: Registry, tmp_path: Path) -> None:
    missing = fetch_model(registry, "models:/linear@nope", tmp_path / "x")
    assert missing.returncode == 1 and "linear@nope" in missing.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "other").write_text("not a model")
    refused = fetch_model(registry, "models:/linear@champion", occupied)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["other"]
    assert fetch_model(registry, "s3://bucket/model", tmp_path / "y").returncode == 2
    assert fetch_model(registry, "models:/linear@champion").returncode == 2


def _local(argv: list[str], mount: Path) -> list[str]:
    """A container's command run here: `ferry` is this interpreter's `-m service`, /mnt/models a folder."""
    assert argv[0] == "ferry"
    return [sys.executable, "-m", "service", *(str(mount) if a == MODEL_MOUNT else a for a in argv[1:])]


def test_a_kserve_pod_on_this_machine(registry: Registry, tmp_path: Path) -> None:
    """The pod KServe builds, its containers run as processes: the init container's command and
    arguments fetch a registered model (the registry's ``linear-onnx``, standing in for ``fraud``) into
    the mount; the serving container's command and env (name templated, port free) serve it under the
    InferenceService's name, ready on the readiness probe's path, answering the v2 protocol."""
    mount = tmp_path / "mnt" / "models"
    name = one_doc(ISVC_FILE)["metadata"]["name"]
    pod = kserve_pod(name, "models:/linear-onnx@champion")["spec"]
    init, server = pod["initContainers"][0], pod["containers"][0]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    init_env = container_env(init) | registry.env()  # the cluster's MLflow → this test's registry
    fetched = subprocess.run(
        _local(init["command"] + init["args"], mount),
        env=clean | init_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert (mount / "MLmodel").is_file()

    port, grpc_port = free_port(), free_port()
    env = {k: v.replace(MODEL_MOUNT, str(mount)) for k, v in container_env(server).items()}
    env |= {"FERRY_PORT": str(port), "FERRY_HOST": "127.0.0.1", "FERRY_SHUTDOWN__GRACE_S": "0"}
    env |= {"FERRY_GRPC_PORT": str(grpc_port)}  # free ports here; the runtime's 8080 and 8081 in a pod
    url = f"http://127.0.0.1:{port}"
    ferry = procs.launch(
        "ferry-kserve",
        _local(server["command"], mount),
        tmp_path / "ferry.log",
        url=url,
        env=clean | env,
        cwd=tmp_path,
    )
    try:
        procs.wait_ready(ferry, server["readinessProbe"]["httpGet"]["path"], 120)
        assert httpx.get(f"{url}{server['livenessProbe']['httpGet']['path']}").status_code == 200
        assert httpx.get(f"{url}/v2/models/{name}/ready").status_code == 200
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        answer = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_name"] == name
        assert answer.json()["outputs"][0]["data"] == [21.0, 21.0, 21.0]  # 2 * (1+2+3+4) + 1
        scrape = httpx.get(f"{url}{runtime()['spec']['annotations']['prometheus.kserve.io/path']}").text
        assert f'ferry_model_ready{{model="{name}"}} 1.0' in scrape
        grpc_client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")  # grpc-v2
        tensor = tritonclient.grpc.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
        assert grpc_client.infer(name, [tensor]).as_numpy("output").tolist() == [[21.0, 21.0, 21.0]]
        grpc_client.close()
    finally:
        stop_server(ferry)
