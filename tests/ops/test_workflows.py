"""The GitHub workflows and the compose file, checked offline: schemas, zizmor, SHA pins, permissions,
timeouts, credentials, expressions in shell, the jobs the delivery issue asks for, and the smoke test
script they all run."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from delivery_support import (
    COMPOSE,
    DEPENDABOT,
    DEPLOY,
    OVERLAYS,
    ROOT,
    WORKFLOWS_DIR,
    load_yaml,
    run,
    steps,
    tool,
    triggers,
    workflow_files,
)

WORKFLOWS = {p.name: p for p in workflow_files()}
EXPECTED = {"ci.yml", "docker.yml", "deploy.yml", "rollback.yml"}


def test_the_four_workflows_exist() -> None:
    assert set(WORKFLOWS) >= EXPECTED


# Schemas and zizmor ----------------------------------------------------------------------------------


def _check_jsonschema(schema: str, *files: Path) -> None:
    exe = tool("check-jsonschema", "it comes with the dev extra: run `make install`")
    result = run(exe, "--builtin-schema", schema, *files)
    assert result.returncode == 0, result.stdout


def test_workflows_match_the_github_workflow_schema() -> None:
    _check_jsonschema("vendor.github-workflows", *WORKFLOWS.values())


def test_compose_file_matches_the_compose_spec() -> None:
    _check_jsonschema("vendor.compose-spec", COMPOSE)


def test_dependabot_config_matches_its_schema() -> None:
    _check_jsonschema("vendor.dependabot", DEPENDABOT)


def test_zizmor_finds_nothing() -> None:
    zizmor = tool("zizmor", "it comes with the dev extra: run `make install`")
    result = run(zizmor, "--offline", "--no-progress", WORKFLOWS_DIR, DEPENDABOT)
    assert result.returncode == 0, result.stdout


# SHA pins --------------------------------------------------------------------------------------------

_USES = re.compile(r"^\s*(?:-\s+)?uses:\s*['\"]?([^\s'\"#]+)['\"]?\s*(#.*)?$")
_PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
_VERSION_COMMENT = re.compile(r"^#\s*v\d+(\.\d+){0,2}\b")


def unpinned_uses(text: str) -> list[str]:
    """Every remote ``uses:`` line not pinned to a full commit SHA with a ``# vX.Y.Z`` comment.
    Local workflows and actions (``./``) are exempt; ``docker://`` images need a sha256 digest."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _USES.match(line)
        if not match:
            if re.search(r"\buses:", line) and not line.lstrip().startswith("#"):
                problems.append(f"line {number}: unparsed uses: {line.strip()}")
            continue
        ref, comment = match.group(1), (match.group(2) or "")
        if ref.startswith("./"):
            continue
        if ref.startswith("docker://"):
            if "@sha256:" not in ref:
                problems.append(f"line {number}: {ref} is not pinned by digest")
            continue
        if not _PINNED.match(ref):
            problems.append(f"line {number}: {ref} is not pinned to a full commit SHA")
        elif not _VERSION_COMMENT.match(comment):
            problems.append(f"line {number}: {ref} lacks a '# vX.Y.Z' comment")
    return problems


def _yaml_uses(workflow: dict[str, Any]) -> list[str]:
    jobs = workflow["jobs"].values()
    return [j["uses"] for j in jobs if "uses" in j] + [s["uses"] for _, s in steps(workflow) if "uses" in s]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_action_is_pinned_to_a_commit_sha(name: str) -> None:
    text = WORKFLOWS[name].read_text()
    assert unpinned_uses(text) == []
    # Every `uses` YAML sees is one the line scan saw: none hides in a flow mapping or a long string.
    scanned = [m.group(1) for line in text.splitlines() if (m := _USES.match(line))]
    assert sorted(scanned) == sorted(_yaml_uses(load_yaml(WORKFLOWS[name])))


@pytest.mark.parametrize(
    "line",
    [
        "      - uses: actions/checkout@v4",
        "      - uses: actions/checkout@main",
        "      - uses: actions/checkout@8e8c483db84b # v6.0.1",
        "      - uses: actions/checkout@8e8c483db84b4bee98b60c0593521ed34d9990e8",
        "      - uses: docker://alpine:3.20",
        "      - {name: x, uses: actions/checkout@v4}",
    ],
)
def test_pin_check_catches_unpinned_uses(line: str) -> None:
    assert unpinned_uses(f"jobs:\n  a:\n    steps:\n{line}\n") != []


# Permissions, timeouts, credentials, expressions ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_no_default_permissions_and_explicit_grants_per_job(name: str) -> None:
    workflow = load_yaml(WORKFLOWS[name])
    assert workflow.get("permissions") == {}, "top level: permissions: {}"
    for job_id, job in workflow["jobs"].items():
        assert isinstance(job.get("permissions"), dict), f"job {job_id} needs its own permissions"
        assert "write-all" not in str(job["permissions"])


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_job_has_a_timeout(name: str) -> None:
    for job_id, job in load_yaml(WORKFLOWS[name])["jobs"].items():
        if "uses" in job:  # a reusable workflow's own jobs carry their timeouts (checked in that file)
            assert job["uses"].startswith("./.github/workflows/"), job["uses"]
            continue
        timeout = job.get("timeout-minutes")
        assert isinstance(timeout, int) and 0 < timeout <= 120, f"job {job_id}: timeout-minutes"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_checkout_never_persists_credentials(name: str) -> None:
    for job_id, step in steps(load_yaml(WORKFLOWS[name])):
        if str(step.get("uses", "")).startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, f"job {job_id}"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_no_expression_is_inlined_into_shell(name: str) -> None:
    """Untrusted values (inputs, event fields, outputs) reach `run:` only through `env:`."""
    for job_id, step in steps(load_yaml(WORKFLOWS[name])):
        assert "${{" not in str(step.get("run", "")), f"job {job_id}, step {step.get('name')!r}"


# What the delivery issue asks of each workflow --------------------------------------------------------


def _runs(workflow: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) for _, s in steps(workflow))


def _uses(workflow: dict[str, Any]) -> str:
    return "\n".join(_yaml_uses(workflow))


def test_ci_runs_every_check() -> None:
    ci = load_yaml(WORKFLOWS["ci.yml"])
    assert set(triggers(ci)) == {"push", "pull_request"}
    assert triggers(ci)["push"]["branches"] == ["main"]
    runs, uses = _runs(ci), _uses(ci)
    for needle in ("make lint", "bandit", "pip-audit", "--cov-fail-under", "make ops", "make loadtest-smoke"):
        assert needle in runs, needle
    assert "tests/unit" in runs and "tests/integration" in runs
    assert "test_drift.py -k docs" in runs
    assert "trufflesecurity/trufflehog@" in uses
    assert ci["jobs"]["test"]["services"]["redis"]["image"].startswith("redis:")
    builds = [s for _, s in steps(ci) if str(s.get("uses", "")).startswith("docker/build-push-action@")]
    assert builds and all(s["with"]["push"] is False for s in builds)
    assert ci["jobs"]["images"]["strategy"]["matrix"]["variant"] == ["cpu", "gpu"]
    assert uses.count("actions/upload-artifact@") >= 3


def test_docker_workflow_builds_scans_signs_and_pushes_every_variant() -> None:
    docker = load_yaml(WORKFLOWS["docker.yml"])
    on = triggers(docker)["push"]
    assert on["branches"] == ["main"] and on["tags"] == ["v*"]
    matrix = docker["jobs"]["build"]["strategy"]["matrix"]["include"]
    assert {(m["variant"], m["arch"]) for m in matrix} == {
        ("cpu", "amd64"),
        ("cpu", "arm64"),
        ("gpu", "amd64"),
    }
    assert all("arm" in m["runner"] for m in matrix if m["arch"] == "arm64"), "arm64 builds natively"
    build_steps = [s for _, s in steps(docker)]
    names = [s.get("name", "") for s in build_steps]
    order = {n: i for i, n in enumerate(names)}
    smoke, push = (
        order[next(n for n in names if n.startswith("Smoke test"))],
        order["Push by digest, with SBOM and provenance attestations"],
    )
    trivy = [i for i, s in enumerate(build_steps) if "trivy-action@" in str(s.get("uses", ""))]
    assert smoke < min(trivy) and max(trivy) < push, "smoke test and scan happen before the push"
    pushed = build_steps[push]["with"]
    assert (
        pushed["sbom"] is True
        and pushed["provenance"] == "mode=max"
        and "push-by-digest=true" in pushed["outputs"]
    )
    assert "cache-from" in pushed and "type=gha" in pushed["cache-from"]
    uses = _uses(docker)
    assert "github/codeql-action/upload-sarif@" in uses and "sigstore/cosign-installer@" in uses
    runs = _runs(docker)
    assert "cosign sign --yes" in runs and "imagetools create" in runs and "deploy/smoke.py" in runs
    publish = docker["jobs"]["publish"]["permissions"]
    assert publish["id-token"] == "write", "keyless signing needs an OIDC token"
    assert docker["jobs"]["deploy-staging"]["if"] == "github.ref == 'refs/heads/main'"
    assert docker["jobs"]["deploy-production"]["if"] == "startsWith(github.ref, 'refs/tags/v')"
    for job in ("deploy-staging", "deploy-production"):
        assert docker["jobs"][job]["uses"] == "./.github/workflows/deploy.yml"


def test_deploy_verifies_rolls_out_smoke_tests_and_rolls_back() -> None:
    deploy = load_yaml(WORKFLOWS["deploy.yml"])
    assert {"workflow_call", "workflow_dispatch"} <= set(triggers(deploy))
    job = deploy["jobs"]["deploy"]
    assert job["environment"]["name"] == "${{ inputs.environment }}"
    assert job["concurrency"]["cancel-in-progress"] is False
    names = [s.get("name", "") for s in job["steps"]]
    by_name = {s.get("name", ""): s for s in job["steps"]}
    verify = next(i for i, n in enumerate(names) if n.startswith("cosign verify"))
    apply = names.index("Apply (rolling update, maxUnavailable 0)")
    assert verify < apply < names.index("Wait for the rollout") < names.index("Smoke test the environment")
    assert "rollout undo" in by_name["Roll back"]["run"]
    assert by_name["Roll back"]["if"] == "failure() && steps.apply.outcome == 'success'"
    assert by_name["Notify Slack"]["if"] == "always()"
    assert "@$CPU_DIGEST" in by_name["Render the overlay with the digests"]["run"]
    options = triggers(deploy)["workflow_dispatch"]["inputs"]["environment"]["options"]
    assert set(options) == set(OVERLAYS), "every environment has an overlay and back"


def test_rollback_is_manual_to_a_chosen_revision() -> None:
    rollback = load_yaml(WORKFLOWS["rollback.yml"])
    dispatch = triggers(rollback)["workflow_dispatch"]
    assert set(triggers(rollback)) == {"workflow_dispatch"}
    assert set(dispatch["inputs"]["environment"]["options"]) == set(OVERLAYS)
    assert "revision" in dispatch["inputs"]
    job = rollback["jobs"]["rollback"]
    deploy_job = load_yaml(WORKFLOWS["deploy.yml"])["jobs"]["deploy"]
    assert job["concurrency"]["group"] == deploy_job["concurrency"]["group"], "never during a deploy"
    assert "--to-revision" in _runs(rollback)


# The smoke test script --------------------------------------------------------------------------------


def _smoke_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_smoke", DEPLOY / "smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Handler = Callable[[BaseHTTPRequestHandler, int], tuple[int, dict[str, str], bytes]]


def _healthy(request: BaseHTTPRequestHandler, calls: int) -> tuple[int, dict[str, str], bytes]:
    """A stand-in Ferry: ready on the second look, one prediction, metrics."""
    if request.path == "/health/live":
        return 200, {}, b'{"status": "live"}'
    if request.path == "/health/ready":
        return (200 if calls > 1 else 503), {}, b"{}"
    if request.path == "/predict":
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        assert len(body["inputs"][0]) == 64
        payload = {"model": body["model"], "version": "3", "outputs": [[0.5] * 10]}
        return 200, {"X-Model-Version": "3"}, json.dumps(payload).encode()
    if request.path == "/metrics":
        return 200, {}, b"ferry_inference_requests_total 1\n"
    return 404, {}, b"{}"


@pytest.fixture
def stub_ferry() -> Iterator[Callable[[Handler], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(handler: Handler) -> str:
        counts: dict[str, int] = {}

        class Stub(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                counts[self.path] = counts.get(self.path, 0) + 1
                status, headers, body = handler(self, counts[self.path])
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_smoke_script_passes_against_a_healthy_ferry(stub_ferry: Callable[[Handler], str]) -> None:
    assert _smoke_module().main([stub_ferry(_healthy), "--timeout", "30"]) == 0


def test_smoke_script_fails_when_prediction_fails(stub_ferry: Callable[[Handler], str]) -> None:
    def broken(request: BaseHTTPRequestHandler, calls: int) -> tuple[int, dict[str, str], bytes]:
        if request.path == "/predict":
            return 500, {}, b'{"error": {"code": "internal"}}'
        return _healthy(request, calls + 1)

    assert _smoke_module().main([stub_ferry(broken), "--timeout", "30"]) == 1


def test_smoke_script_fails_when_never_ready(stub_ferry: Callable[[Handler], str]) -> None:
    def unready(request: BaseHTTPRequestHandler, calls: int) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"{}") if request.path == "/health/ready" else _healthy(request, calls)

    assert _smoke_module().main([stub_ferry(unready), "--timeout", "1"]) == 1


def test_deploy_scripts_exist() -> None:
    for path in (DEPLOY / "smoke.py", DEPLOY / "smoke-env.sh"):
        assert path.exists() and path.stat().st_mode & 0o111, f"{path.relative_to(ROOT)} must be executable"


def test_the_perf_baseline_comes_from_a_push_to_main_only() -> None:
    """A pull request's run on a branch named main (from a fork) or a manual run must not become the
    baseline the next change is compared with."""
    steps = [
        step
        for job in load_yaml(WORKFLOWS["ci.yml"])["jobs"].values()
        for step in job.get("steps", [])
        if "gh run list" in step.get("run", "")
    ]
    assert steps, "no baseline lookup in ci.yml"
    for step in steps:
        lookup = next(line for line in step["run"].splitlines() if "gh run list" in line)
        assert "--branch main" in lookup and "--event push" in lookup and "--status success" in lookup
