"""Delivery files against what Ferry actually reads and serves, so neither can drift from the other:
environment variable names (Settings, derived recursively), their values (Settings validates them),
HTTP paths (the app's route table), ports, metric names (a real scrape), model names, make targets,
and the links and commands of the docs (`-k docs`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.routing import Match

from delivery_support import (
    ADAPTER_VALUES,
    COMPOSE,
    DELIVERY_DOC,
    DEPLOY,
    DOCKERFILES,
    GRPC_PORT,
    OVERLAYS,
    PORT,
    ROOT,
    SERVE_CMD,
    container,
    dockerfile,
    install_script_variables,
    is_setting,
    json_form,
    load_yaml,
    one,
    resources,
    setting_env_names,
    settings_from,
    steps,
    workflow_files,
)
from service.api.app import create_app, route_table
from service.config import Settings

_NAME = re.compile(r"\b(FERRY_[A-Z0-9_]+)\b")
_SETTING_PREFIXES = ("FERRY_", "MLFLOW_")


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# Environment variable names -----------------------------------------------------------------------------


def test_setting_names_are_derived_from_the_settings_tree() -> None:
    names, prefixes = setting_env_names()
    assert {"FERRY_MODELS", "FERRY_DEVICE", "FERRY_BATCH__MAX_ROWS", "FERRY_SHUTDOWN__GRACE_S"} <= names
    assert {"MLFLOW_TRACKING_URI", "FERRY_REDIS_URL", "FERRY_CACHE__TTL_S"} <= names
    assert "FERRY_CACHE__MODELS__" in prefixes
    top = set(Settings.model_fields)
    assert len([n for n in names if n.count("__") == 0 and n.startswith("FERRY_")]) >= len(top) - 2


@pytest.mark.parametrize(
    ("name", "real"),
    [
        ("FERRY_BATCH__MAX_ROWS", True),
        ("FERRY_BATCH_MAX_ROWS", False),
        ("FERRY_SHUTDOWN__GRACE", False),
        ("FERRY_REDIS", False),
        ("FERRY_CACHE__MODELS__image-cnn", True),
        ("FERRY_CACHE__MODELS__", False),
    ],
)
def test_drift_check_tells_real_settings_from_typos(name: str, real: bool) -> None:
    assert is_setting(name) is real


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_env_names_are_settings_or_install_variables(variant: str) -> None:
    install = install_script_variables()
    assert install == {"FERRY_VENV", "FERRY_EXTRAS", "FERRY_EDITABLE"}, "scripts/install.sh changed"
    for name in _NAME.findall(_without_comments(DOCKERFILES[variant].read_text())):
        assert is_setting(name) or name in install, f"Dockerfile.{variant}: {name} is not a Ferry setting"


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _ferry_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _compose()["services"].items()
        if str(service.get("image", "")).startswith("ferry:")
    }


def test_compose_env_names_are_settings() -> None:
    assert {"ferry", "register-demo", "ferry-gpu"} <= set(_ferry_services())
    for name, service in _ferry_services().items():
        for key in _compose_environment(service):
            assert not key.startswith("FERRY_") or is_setting(key), f"compose {name}: {key}"


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_manifest_env_names_are_settings(env: str) -> None:
    names = [e["name"] for e in container(env).get("env", [])]
    for cm in resources(env, "ConfigMap"):
        names += list(cm["data"])
    for name in names:
        assert not name.startswith("FERRY_") or is_setting(name), f"{env}: {name}"


def test_workflow_and_script_env_names_are_settings() -> None:
    files = [*workflow_files(), *DEPLOY.glob("*.sh"), DEPLOY / "smoke.py"]
    for path in files:
        for name in _NAME.findall(_without_comments(path.read_text())):
            assert is_setting(name), f"{path.relative_to(ROOT)}: {name} is not a Ferry setting"


# Values -----------------------------------------------------------------------------------------------


def _valid(environ: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    relevant = {k: v for k, v in environ.items() if k.startswith(_SETTING_PREFIXES) and is_setting(k)}
    try:
        return settings_from(relevant, monkeypatch)
    except Exception as err:  # pydantic's ValidationError, with the field and the value
        pytest.fail(f"{where}: Ferry would refuse these settings: {err}")


def test_compose_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _ferry_services().items():
        settings = _valid(_compose_environment(service), f"compose {name}", monkeypatch)
        if name != "register-demo":
            assert settings.models, f"compose {name} serves no model"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_values_are_valid_settings(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    df = dockerfile(variant)
    _valid(df.env(df.stages[-1]), f"Dockerfile.{variant}", monkeypatch)


def test_smoke_run_settings_of_the_docker_workflow_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    docker = load_yaml(ROOT / ".github" / "workflows" / "docker.yml")
    smoke = next(s for _, s in steps(docker) if s.get("name", "").startswith("Smoke test"))["run"]
    environ = {"FERRY_MODELS": docker["env"]["DEMO_MODELS"]}
    environ.update(dict(re.findall(r"-e (FERRY_[A-Z_]+)=(\w+)", smoke)))
    settings = _valid(environ, "docker.yml smoke test", monkeypatch)
    assert settings.device == "cpu" and len(settings.models) == 3


# HTTP paths, ports, metrics -----------------------------------------------------------------------------


def _served(path: str, method: str) -> bool:
    """Whether Ferry's router answers ``method path`` with a route (Starlette's own matching, which
    also sees into included routers)."""
    scope = {
        "type": "http",
        "path": path,
        "method": method,
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return any(route.matches(scope)[0] == Match.FULL for route in create_app(Settings()).routes)


def _used_paths() -> dict[tuple[str, str], str]:
    """{(method, path): where} for every Ferry URL the delivery files call."""
    used: dict[tuple[str, str], str] = {}
    for variant, path in DOCKERFILES.items():
        for match in re.finditer(rf"http://127\.0\.0\.1:{PORT}(/[\w/.-]*)", path.read_text()):
            used["GET", match.group(1)] = f"Dockerfile.{variant} HEALTHCHECK"
    for env in OVERLAYS:
        c = container(env)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            used["GET", c[probe]["httpGet"]["path"]] = f"{env} {probe}"
        for endpoint in one(env, "ServiceMonitor")["spec"]["endpoints"]:
            used["GET", endpoint["path"]] = f"{env} ServiceMonitor"
    smoke = (DEPLOY / "smoke.py").read_text()
    for name, path in re.findall(r'^([A-Z]+) = "(/[\w/.-]*)"', smoke, re.MULTILINE):
        used["POST" if name == "PREDICT" else "GET", path] = "deploy/smoke.py"
    prometheus = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
    if prometheus.exists():
        for job in yaml.safe_load(prometheus.read_text())["scrape_configs"]:
            if job["job_name"] == "ferry":
                used["GET", job.get("metrics_path", "/metrics")] = "monitoring/prometheus/prometheus.yml"
    return used


def test_every_path_called_is_a_route_ferry_serves() -> None:
    used = _used_paths()
    paths = {path for _, path in used}
    assert {"/health/live", "/health/ready", "/metrics", "/predict"} <= paths
    missing = {f"{m} {p}": where for (m, p), where in used.items() if not _served(p, m)}
    assert not missing, f"not routes of Ferry: {missing}"


def test_route_check_can_fail() -> None:
    assert not _served("/health/lives", "GET")
    assert not _served("/predict", "GET"), "POST only"


def test_the_port_is_the_same_everywhere() -> None:
    assert Settings().port == PORT
    for variant in DOCKERFILES:
        df = dockerfile(variant)
        cmd = df.effective(df.stages[-1], "CMD")
        assert cmd is not None and json_form(cmd.value) == SERVE_CMD
        assert [i.value for i in df.stages[-1].all("EXPOSE")] == [f"{PORT} {GRPC_PORT}"]
        assert df.env(df.stages[-1]).get("FERRY_PORT") == str(PORT)
    for env in OVERLAYS:
        ports = {p["name"]: p["containerPort"] for p in container(env)["ports"]}
        assert ports["http"] == PORT and set(ports) <= {"http", "metrics"}, ports
    for name, service in _ferry_services().items():
        for mapping in service.get("ports", []):
            assert str(mapping).rsplit(":", 1)[-1] == str(PORT), f"compose {name}: {mapping}"
    prometheus = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
    if prometheus.exists():
        jobs = {j["job_name"]: j for j in yaml.safe_load(prometheus.read_text())["scrape_configs"]}
        targets = [t for sc in jobs["ferry"]["static_configs"] for t in sc["targets"]]
        assert all(t.endswith(f":{PORT}") for t in targets), targets


def _exported_metric_names() -> set[str]:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    client = TestClient(create_app(Settings()))  # no `with`: no lifespan, so no model is loaded
    try:
        client.get("/health/live")  # one request, so that per-route HTTP metrics exist
        text = client.get("/metrics").text
    finally:
        client.close()
    return {family.name for family in text_string_to_metric_families(text)}


def test_autoscaling_metrics_are_exported_by_ferry() -> None:
    """The HPA (through prometheus-adapter) scales on metrics a real scrape of Ferry contains."""
    wanted = {
        m["pods"]["metric"]["name"] for m in one("production", "HorizontalPodAutoscaler")["spec"]["metrics"]
    }
    wanted |= {
        r["seriesQuery"].split("{")[0] for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    }
    exported = _exported_metric_names()
    assert wanted - exported == set(), f"exported: {sorted(exported)}"


# Models and make targets ---------------------------------------------------------------------------------


def _model_entries() -> dict[str, str]:
    """{where: FERRY_MODELS value} across compose, the manifests and the docker workflow."""
    out = {
        f"compose {n}": _compose_environment(s)["FERRY_MODELS"]
        for n, s in _ferry_services().items()
        if n != "register-demo"
    }
    for env in OVERLAYS:
        config = next(
            cm["data"]
            for cm in resources(env, "ConfigMap")
            if cm["metadata"]["name"].startswith("ferry-config")
        )
        out[f"{env} ConfigMap"] = config["FERRY_MODELS"]
    out["docker.yml"] = load_yaml(ROOT / ".github" / "workflows" / "docker.yml")["env"]["DEMO_MODELS"]
    return out


def test_served_models_are_the_demo_models() -> None:
    register = (ROOT / "models" / "register.py").read_text()
    demo = {"tabular-mlp-onnx", "tabular-mlp", "image-cnn"}
    assert all(f'"{name}"' in register for name in demo), "models/register.py registers other models"
    for where, value in _model_entries().items():
        entries = dict(item.split("=", 1) for item in value.split(","))
        assert set(entries) == demo, where
        assert all(uri == f"models:/{name}@champion" for name, uri in entries.items()), where
    smoke = (DEPLOY / "smoke.py").read_text()
    assert re.search(r'"--model", default="(tabular-mlp-onnx)"', smoke)


def _make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def _make_invocations(text: str) -> set[str]:
    return {
        t
        for args in re.findall(r"(?:^|[\s;&|`(])make\s+([^\n`;&|)]*)", text, re.MULTILINE)
        for t in args.split("#")[0].split()
        if not t.startswith("-") and "=" not in t and re.fullmatch(r"[a-z][\w.-]*", t)
    }


def test_workflows_call_make_targets_that_exist() -> None:
    targets = _make_targets()
    for path in workflow_files():
        workflow = load_yaml(path)
        for _, step in steps(workflow):
            for target in _make_invocations(str(step.get("run", ""))):
                assert target in targets, f"{path.name}: `make {target}` is not a Makefile target"


# Docs (`pytest tests/ops/test_drift.py -k docs`) ---------------------------------------------------------


def _docs() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.exists()]


def _code(text: str) -> str:
    """The fenced code blocks and inline code spans of a Markdown text."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    return "\n".join(fenced + inline)


NOT_SERVED = {"/redoc"}
"""Paths the docs mention as not served ("there is no `/redoc`"): checked to be absent."""


def _route_mentions(text: str) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route a doc names in inline code: ``GET /models``, ``/v2/...``,
    ``/health/*``, ``/v2/models/{name}[/versions/{version}]`` (both forms). Filesystem paths are told
    apart by their first segment, which no route of Ferry's has."""
    app = create_app(Settings(admin_token="token"))
    firsts = {path.split("/")[1] for path in route_table(app)} | {p.split("/")[1] for p in NOT_SERVED}
    out = []
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    for span in spans:
        match = re.fullmatch(r"(?:(GET|POST|PUT|DELETE) )?(/[\w{}.*/\[\]-]*)", span)
        if match is None or match[2].split("/")[1].split("[")[0] not in firsts:
            continue
        path = match[2]
        variants = [re.sub(r"\[([^\]]*)\]", "", path), re.sub(r"\[([^\]]*)\]", r"\1", path)]
        out += [(match[1] or "", variant) for variant in dict.fromkeys(variants)]
    return out


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_docs_routes_are_served(doc: Path) -> None:
    """Every route README and docs/ name is one Ferry serves (with that method, when they give one), or
    one they say is not served and is not."""
    app = create_app(Settings(admin_token="token"))
    table = route_table(app)
    for method, path in _route_mentions(doc.read_text(encoding="utf-8")):
        if path in NOT_SERVED:
            assert path not in table, f"{doc.name} says {path} is not served, but it is"
        elif path.endswith(("/...", "/*")):
            prefix = path.rstrip(".*")
            assert any(p.startswith(prefix) for p in table), f"{doc.name}: no route under {path}"
        else:
            methods = table.get(path)
            assert methods is not None, f"{doc.name}: {path} is not a route of Ferry"
            assert not method or method in methods, f"{doc.name}: {method} {path}; Ferry serves {methods}"


def test_route_mentions_are_found() -> None:
    found = _route_mentions("`GET /v2/models/{name}[/versions/{version}]`, `/app/.ferry`, `/health/*`")
    assert found == [
        ("GET", "/v2/models/{name}"),
        ("GET", "/v2/models/{name}/versions/{version}"),
        ("", "/health/*"),
    ]


def test_docs_say_where_the_demo_registration_puts_artifacts() -> None:
    """docs/delivery.md says the compose stack's demo models go through the MLflow server: true while
    models/register.py leaves a tracking server's experiments to the server's artifact location."""
    sys.path.insert(0, str(ROOT / "models"))
    try:
        import register
    finally:
        sys.path.remove(str(ROOT / "models"))
    assert register.artifact_location("http://mlflow:5000") is None
    assert (
        register.artifact_location(
            "sqlite:///x.db",
        )
        is not None
    )
    text = " ".join(DELIVERY_DOC.read_text().split())
    assert "the server chooses `mlflow-artifacts:/`" in text
    assert "Known gap" not in text


def test_docs_exist() -> None:
    assert ROOT / "docs" / "delivery.md" in _docs()


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_docs_links_resolve(doc: Path) -> None:
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_docs_commands_exist(doc: Path) -> None:
    code = _code(doc.read_text(encoding="utf-8"))
    targets = _make_targets()
    for target in _make_invocations(code):
        assert target in targets, f"{doc.name}: `make {target}` is not a Makefile target"
    help_text = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    commands = set(re.search(r"\{([\w,-]+)\}", help_text).group(1).split(","))  # type: ignore[union-attr]
    for command in re.findall(r"(?:^|[\s`])ferry ([a-z][\w-]*)", code, re.MULTILINE):
        assert command in commands, f"{doc.name}: `ferry {command}` is not a ferry command ({commands})"
    for path in re.findall(r"(?<![\w/.-])((?:docker|deploy|scripts|monitoring|\.github)/[\w./-]+\w)", code):
        assert (ROOT / path).exists() or "<" in path, f"{doc.name}: {path} does not exist"


def test_compose_publishes_on_loopback_only_and_keeps_grafana_s_password_out_of_the_file() -> None:
    """The local stack is for this machine: no port on every interface, no known admin password."""
    services = _compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"compose {name} publishes {port} beyond loopback"
    grafana = _compose_environment(services["grafana"])
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in services["grafana"]["secrets"]
    assert ":?" in _compose()["secrets"]["grafana_admin_password"]["file"], "no default password file"
