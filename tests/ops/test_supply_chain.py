"""Supply chain (issue 14): hashed lock files that scripts/install.sh and both images install from with
pip --require-hashes, every FROM pinned by digest, and `make lock` (scripts/lock.py) refreshing both.

Offline: the locks are parsed and held against pyproject.toml and the installed environment, install.sh
runs against a stand-in Python that records what pip is asked to do, and lock.py's registry client
talks to a registry served here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from delivery_support import (
    DOCKERFILES,
    DOCKERIGNORE,
    INSTALL_SCRIPT,
    ROOT,
    Dockerfile,
    Stage,
    dockerfile,
    dockerignore_rules,
    in_context,
)

LOCKS = ROOT / "locks"
IMAGES = LOCKS / "images.txt"
# install.sh's FERRY_EXTRAS -> the lock it installs.
LOCK_OF_EXTRAS = {"": "cpu", "dev": "cpu-dev", "gpu": "gpu", "dev,gpu": "gpu-dev", "gpu,dev": "gpu-dev"}
LOCK_NAMES = ("cpu", "cpu-dev", "gpu", "gpu-dev")
EXTRAS_OF_LOCK = {"cpu": (), "cpu-dev": ("dev",), "gpu": ("gpu",), "gpu-dev": ("dev", "gpu")}
SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})")
DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})$")


# Lock files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    hashes: tuple[str, ...]
    line: int


def parse_lock(text: str) -> dict[str, Pin]:
    """Every requirement of a lock, continuations joined and comments dropped. Only ``name==version``
    followed by ``--hash=sha256:<64 hex>`` options is accepted: a range, an option line (an index, an
    include, an editable), a URL or another hash kind raises ValueError."""
    pins: dict[str, Pin] = {}
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line and not buf:
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, (buf + line).strip()))
        buf = ""
    if buf:
        raise ValueError(f"line {start}: a continuation runs off the end")
    for number, line in logical:
        requirement, *options = line.split()
        if ";" in requirement or ";" in " ".join(options):
            raise ValueError(f"line {number}: markers are not expected in a platform lock: {line}")
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s=<>!~*,@]*)", requirement)
        if not match:
            raise ValueError(f"line {number}: not an exact `name==version` pin: {requirement}")
        hashes = [SHA256.fullmatch(option) for option in options]
        if not options or not all(hashes):
            raise ValueError(f"line {number}: every option must be --hash=sha256:<64 hex>: {line}")
        name = canonicalize_name(match.group(1))
        if name in pins:
            raise ValueError(f"line {number}: {name} is pinned twice")
        pins[name] = Pin(name, Version(match.group(2)), tuple(h.group(1) for h in hashes if h), number)
    return pins


def lock(name: str) -> dict[str, Pin]:
    return parse_lock((LOCKS / f"{name}.txt").read_text())


@pytest.mark.parametrize("name", LOCK_NAMES)
def test_every_requirement_of_each_lock_is_an_exact_pin_with_sha256_hashes(name: str) -> None:
    pins = lock(name)
    assert len(pins) > 50, f"locks/{name}.txt pins {len(pins)} packages: truncated?"
    for pin in pins.values():
        assert pin.hashes and len(set(pin.hashes)) == len(pin.hashes), pin


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("numpy==2.4.6\n", "every option"),
        ("numpy>=2 \\\n    --hash=sha256:" + "a" * 64 + "\n", "exact"),
        ("numpy==2.* \\\n    --hash=sha256:" + "a" * 64 + "\n", "exact"),
        ("--index-url https://example.org/simple\n", "exact"),
        ("-e .\n", "exact"),
        ("numpy @ https://example.org/numpy.whl\n", "exact"),
        ("numpy==2.4.6 --hash=sha256:abc\n", "every option"),
        ("numpy==2.4.6 --hash=md5:" + "a" * 32 + "\n", "every option"),
        ("numpy==2.4.6 --hash=sha256:" + "a" * 64 + " --no-binary numpy\n", "every option"),
        ("numpy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 + " \\\n", "runs off"),
        (
            "numpy==2.4.6 --hash=sha256:" + "a" * 64 + "\nNumPy==2.4.6 --hash=sha256:" + "b" * 64 + "\n",
            "twice",
        ),
    ],
)
def test_lock_parser_refuses_what_pip_would_install_unchecked(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_lock(text)


def test_torch_is_the_cpu_build_in_the_cpu_locks_and_pypis_cuda_build_in_the_gpu_locks() -> None:
    locks = {name: lock(name) for name in LOCK_NAMES}
    assert len({pins["torch"].version.public for pins in locks.values()}) == 1, "one torch version"
    for name in ("cpu", "cpu-dev"):
        pins = locks[name]
        assert pins["torch"].version.local == "cpu", f"{name}: {pins['torch'].version}"
        # cp311 on Linux x86_64 (make, CI, amd64 image) and aarch64 (arm64 image) at least.
        assert len(pins["torch"].hashes) >= 2, f"{name}: torch's CPU wheels for x86_64 and aarch64"
        assert "onnxruntime" in pins and "onnxruntime-gpu" not in pins
        assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"], name
    for name in ("gpu", "gpu-dev"):
        pins = locks[name]
        assert pins["torch"].version.local is None, f"{name}: PyPI's torch is the CUDA build"
        assert "onnxruntime-gpu" in pins
        assert "onnxruntime" not in pins, (
            f"{name}: the CPU onnxruntime would overwrite onnxruntime-gpu's files"
        )
        assert any(n.startswith("nvidia-") for n in pins), f"{name}: torch's CUDA libraries"


@pytest.mark.parametrize(("small", "large"), [("cpu", "cpu-dev"), ("gpu", "gpu-dev"), ("gpu-dev", "cpu-dev")])
def test_locks_agree_so_the_images_ship_what_make_test_tested(small: str, large: str) -> None:
    """cpu.txt is cpu-dev.txt without the dev tools, gpu.txt gpu-dev.txt without them, and the GPU locks
    differ from the CPU ones only in torch's build and the GPU packages."""
    a, b = lock(small), lock(large)
    shared = a.keys() & b.keys()
    if small.startswith("gpu") and large.startswith("cpu"):
        shared -= {"torch"}  # the CUDA and the CPU build
    assert {n: (str(a[n].version), str(b[n].version)) for n in shared if a[n].version != b[n].version} == {}
    if small.split("-")[0] == large.split("-")[0]:
        assert a.keys() <= b.keys(), sorted(a.keys() - b.keys())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements_of(project: dict[str, Any], extras: tuple[str, ...]) -> list[Requirement]:
    """The base dependencies and the extras' (a self-reference such as `ferry[postgres]` expanded)."""
    name = canonicalize_name(project["project"]["name"])
    optional = project["project"].get("optional-dependencies", {})
    out: list[Requirement] = []
    todo, seen = [None, *extras], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["project"]["dependencies"] if extra is None else optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                todo.extend(requirement.extras)
            else:
                out.append(requirement)
    return out


def out_of_step(requirements: list[Requirement], pins: dict[str, Pin], gpu: bool) -> list[str]:
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if gpu and name == "onnxruntime":
            continue  # onnxruntime-gpu stands in for it (checked above)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{requirement}: not in the lock")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement}: the lock pins {pin.version}")
    return problems


@pytest.mark.parametrize("name", LOCK_NAMES)
def test_each_lock_is_in_step_with_pyproject(name: str) -> None:
    """Every dependency pyproject.toml names (base, the lock's extras, the build requirements) is pinned,
    at a version its specifier allows. A failure here: run `make lock`."""
    project = pyproject()
    requirements = requirements_of(project, EXTRAS_OF_LOCK[name])
    requirements += [Requirement(r) for r in project["build-system"]["requires"]]
    assert out_of_step(requirements, lock(name), gpu=name.startswith("gpu")) == []


def test_the_step_check_can_fail() -> None:
    pins = parse_lock("numpy==2.4.6 --hash=sha256:" + "a" * 64 + "\n")
    problems = out_of_step([Requirement("numpy>=3"), Requirement("orjson>=3.10")], pins, gpu=False)
    assert problems == ["numpy>=3: the lock pins 2.4.6", "orjson>=3.10: not in the lock"]
    extras = requirements_of(pyproject(), ("dev",))
    assert {"psycopg", "pytest", "torch"} <= {canonicalize_name(r.name) for r in extras}, (
        "ferry[postgres] expanded"
    )


def _venv_lock() -> str:
    torch = Version(metadata.version("torch"))
    return "cpu-dev" if torch.local == "cpu" else "gpu-dev"


def test_this_environment_is_the_lock() -> None:
    """What the tests run in is what the lock pins: `make install` installed it from locks/cpu-dev.txt
    (locks/gpu-dev.txt on a GPU machine). A failure after a lock refresh: run `make install`."""
    pins = lock(_venv_lock())
    wrong = {}
    for name, pin in pins.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(pin.version), None)
            continue
        if installed != pin.version:
            wrong[name] = (str(pin.version), str(installed))
    assert wrong == {}, "(locked, installed); run `make install`"


def test_the_lock_holds_every_dependency_of_what_it_pins() -> None:
    """Walk the dependency tree from pyproject.toml through the installed packages' metadata (markers
    evaluated here, extras followed): every package reached is pinned at a version its dependents allow.
    This is what pip --require-hashes enforces at install time, checked without the network."""
    name = _venv_lock()
    pins = lock(name)
    todo = [(r, "pyproject.toml") for r in requirements_of(pyproject(), EXTRAS_OF_LOCK[name])]
    seen: set[tuple[str, frozenset[str]]] = set()
    problems = []
    while todo:
        requirement, parent = todo.pop()
        package = canonicalize_name(requirement.name)
        if name.startswith("gpu") and package == "onnxruntime":
            continue
        pin = pins.get(package)
        if pin is None:
            problems.append(f"{requirement} (from {parent}): not in locks/{name}.txt")
            continue
        if not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} (from {parent}): locks/{name}.txt pins {pin.version}")
        key = (package, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.requires(package) or []:
            child = Requirement(text)
            environments = [{"extra": e} for e in ("", *requirement.extras)]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                todo.append((child, f"{package}=={pin.version}"))
    assert problems == []
    assert len(seen) > 50


# install.sh ----------------------------------------------------------------------------------------

STAND_IN = """#!/usr/bin/env bash
# A Python stand-in for install.sh: records each call; `pip show` finds nothing unless SHOW_FINDS is set;
# the locked install fails FAIL_LOCKED times.
printf '%s\\n' "$*" >> "$CALLS"
case "$*" in
  "-m pip show"*) [ -n "${SHOW_FINDS:-}" ] && exit 0 || exit 1 ;;
  *--require-hashes*)
    n=$(grep -c -- --require-hashes "$CALLS")
    [ "$n" -le "${FAIL_LOCKED:-0}" ] && exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, Path]:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return python, tmp_path / "calls.txt"


def run_install(stand_in: tuple[Path, Path], **env: str) -> tuple[int, list[str], str]:
    python, calls = stand_in
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "TORCH_", "PIP_"))}
    environ |= {"PYTHON": str(python), "FERRY_VENV": "", "CALLS": str(calls)} | env
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return result.returncode, recorded, result.stderr


def pip_installs(calls: list[str]) -> list[list[str]]:
    return [call.split()[3:] for call in calls if call.startswith("-m pip install ")]


@pytest.mark.parametrize(("extras", "editable"), [("", "0"), ("dev", "1"), ("gpu", "0"), ("dev,gpu", "1")])
def test_install_sh_installs_the_extras_lock_with_require_hashes_then_ferry_without_deps(
    stand_in: tuple[Path, Path], extras: str, editable: str
) -> None:
    code, calls, stderr = run_install(stand_in, FERRY_EXTRAS=extras, FERRY_EDITABLE=editable)
    assert code == 0, stderr
    installs = pip_installs(calls)
    assert len(installs) == 2, calls
    locked, project = installs
    expected = f"locks/{LOCK_OF_EXTRAS[extras]}.txt"
    assert "--require-hashes" in locked and locked[locked.index("-r") + 1] == expected, locked
    assert (ROOT / expected).exists()
    assert "--only-binary" in locked and locked[locked.index("--only-binary") + 1] == ":all:"
    assert not [a for a in locked if a.startswith("-") and "index" in a], "no extra index unless asked"
    assert "--no-deps" in project and project[-1] == "." and ("-e" in project) == (editable == "1"), project
    assert "--no-build-isolation" in project, (
        "build requirements come from the lock, not an unpinned download"
    )
    if "gpu" in extras:
        assert any("CUDAExecutionProvider" in c for c in calls), "the GPU install checks its CUDA provider"


def test_install_sh_passes_torch_index_url_as_an_extra_index(stand_in: tuple[Path, Path]) -> None:
    url = "https://download.pytorch.org/whl/cpu"
    code, calls, _ = run_install(stand_in, FERRY_EXTRAS="", TORCH_INDEX_URL=url)
    locked = pip_installs(calls)[0]
    assert code == 0 and "--require-hashes" in locked and locked[locked.index("--extra-index-url") + 1] == url


def test_install_sh_tries_pytorchs_cpu_index_only_for_a_cpu_lock_with_torch_index_url_unset(
    stand_in: tuple[Path, Path], tmp_path: Path
) -> None:
    code, calls, stderr = run_install(stand_in, FERRY_EXTRAS="dev", FAIL_LOCKED="1")
    first, second, _project = pip_installs(calls)
    assert code == 0 and "--extra-index-url" not in first and "retrying" in stderr
    assert second[second.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--require-hashes" in second
    for env in ({"FERRY_EXTRAS": "gpu"}, {"FERRY_EXTRAS": "dev", "TORCH_INDEX_URL": ""}):
        (tmp_path / "calls.txt").unlink()
        code, calls, _ = run_install(stand_in, FAIL_LOCKED="1", **env)
        assert code != 0 and len(pip_installs(calls)) == 1, env


def test_install_sh_removes_both_onnxruntime_builds_when_switching(stand_in: tuple[Path, Path]) -> None:
    code, calls, _ = run_install(stand_in, FERRY_EXTRAS="gpu", SHOW_FINDS="1")
    uninstall = next(n for n, c in enumerate(calls) if c.startswith("-m pip uninstall"))
    locked = next(n for n, c in enumerate(calls) if "--require-hashes" in c)
    assert (
        code == 0
        and uninstall < locked
        and {"onnxruntime", "onnxruntime-gpu"} <= set(calls[uninstall].split())
    )


def test_install_sh_refuses_extras_it_has_no_lock_for(stand_in: tuple[Path, Path]) -> None:
    code, calls, stderr = run_install(stand_in, FERRY_EXTRAS="postgres")
    assert code == 2 and "no lock file" in stderr and pip_installs(calls) == []


# Images --------------------------------------------------------------------------------------------


def _extras_of(df: Dockerfile, stage: Stage, run_value: str) -> str:
    inline = re.search(r"\bFERRY_EXTRAS=('[^']*'|\"[^\"]*\"|\S*)", run_value)
    if inline:
        return inline.group(1).strip("'\"")
    return df.env(stage).get("FERRY_EXTRAS", "dev")  # install.sh's default


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_each_image_install_runs_from_a_lock_copied_in_before_it(variant: str) -> None:
    """Every install.sh run in a Dockerfile installs the lock its FERRY_EXTRAS selects, and that lock was
    copied into the image (from the build context) before the run."""
    df = dockerfile(variant)
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    runs = 0
    for stage in df.stages:
        ordered = [i for s in reversed(df.chain(stage)) for i in s.instructions]
        for n, inst in enumerate(ordered):
            if (
                inst.keyword != "RUN"
                or "scripts/install.sh" not in inst.value
                or inst not in stage.instructions
            ):
                continue
            runs += 1
            wanted = f"locks/{LOCK_OF_EXTRAS[_extras_of(df, stage, inst.value)]}.txt"
            copied = [i.value for i in ordered[:n] if i.keyword == "COPY" and "--from=" not in i.value]
            assert any(wanted in c.split()[:-1] for c in copied), (
                f"{variant} line {inst.line}: {wanted} not copied"
            )
            assert in_context(wanted, rules), f".dockerignore leaves {wanted} out"
    assert runs >= 2
    every_run = [i.value for s in df.stages for i in s.all("RUN")]
    assert not any(re.search(r"\b(pip3?|uv pip)\s+install\b", r) for r in every_run), "pip only in install.sh"


def test_the_shipped_images_install_the_locks_without_dev_tools() -> None:
    for variant, expected in (("cpu", ""), ("gpu", "gpu")):
        df = dockerfile(variant)
        build = df.stage("build")
        assert build is not None
        install = next(i for i in build.all("RUN") if "scripts/install.sh" in i.value)
        assert _extras_of(df, build, install.value) == expected, variant


def images_lock() -> dict[str, tuple[str, str]]:
    rows = (
        line.split(maxsplit=2)
        for line in IMAGES.read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


def _froms() -> list[Any]:
    """(variant, FROM as written, expanded with the ARG defaults) of each FROM naming an image."""
    out = []
    for variant in sorted(DOCKERFILES):
        df = dockerfile(variant)
        names = {s.name for s in df.stages}
        out += [
            pytest.param(variant, s.base, df.expand(s.base), id=f"{variant}:{s.name}")
            for s in df.stages
            if s.base not in names
        ]
    return out


@pytest.mark.parametrize(("variant", "written", "expanded"), _froms())
def test_every_from_is_pinned_by_digest(variant: str, written: str, expanded: str) -> None:
    """`FROM image:tag@sha256:<64 hex>`, the digest locks/images.txt records for that tag. An image that
    `make lock` could not look up is listed there as unresolved, with why: reported as xfail, never passed."""
    ref, _, _ = expanded.partition("@")
    assert re.fullmatch(r"[a-z0-9./_-]+:[\w.-]+", ref), f"{variant}: {written} names no explicit tag"
    recorded = images_lock().get(ref)
    assert recorded is not None, f"{ref} is not in locks/images.txt: run `make lock`"
    digest, note = recorded
    if digest == "unresolved":
        assert "@" not in written, f"{variant}: {written} carries a digest images.txt does not record"
        pytest.xfail(f"{ref} is not pinned: `make lock` could not look it up ({note})")
    match = DIGEST.search(expanded)
    assert match, f"{variant}: FROM {written} is not pinned by digest"
    assert match.group(1) == digest, f"{variant}: {written} differs from locks/images.txt ({digest})"


def test_images_lock_lists_only_images_the_dockerfiles_use() -> None:
    used = {param.values[2].partition("@")[0] for param in _froms()}
    assert set(images_lock()) == used


# scripts/lock.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lockpy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_lock_script", ROOT / "scripts" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("ref", "registry", "repository", "tag"),
    [
        ("python:3.11-slim-bookworm", "docker.io", "library/python", "3.11-slim-bookworm"),
        ("nvidia/cuda:13.0.2-base-ubuntu24.04", "docker.io", "nvidia/cuda", "13.0.2-base-ubuntu24.04"),
        ("ghcr.io/astral-sh/uv:0.13.8", "ghcr.io", "astral-sh/uv", "0.13.8"),
        ("localhost:5000/team/app", "localhost:5000", "team/app", "latest"),
        ("nvcr.io/nvidia/pytorch:25.01-py3", "nvcr.io", "nvidia/pytorch", "25.01-py3"),
    ],
)
def test_lock_py_reads_image_references_as_docker_does(
    lockpy: ModuleType, ref: str, registry: str, repository: str, tag: str
) -> None:
    image = lockpy.ImageRef.parse(ref)
    assert (image.registry, image.repository, image.tag) == (registry, repository, tag)


def test_lock_py_pins_only_image_froms_and_keeps_tags_and_stage_names(lockpy: ModuleType) -> None:
    text = (
        "ARG V=3.11\nFROM --platform=$BUILDPLATFORM python:${V}-slim AS deps\nFROM deps AS build\n"
        "FROM ghcr.io/x/y:1@sha256:" + "0" * 64 + "\nFROM scratch\n"
    )
    digest = "sha256:" + "1" * 64
    assert [e for _, e, _ in lockpy.image_froms(text)] == ["python:3.11-slim", "ghcr.io/x/y:1"]
    pinned = lockpy.pin_froms(text, {"python:3.11-slim": digest, "ghcr.io/x/y:1": None})
    assert pinned.splitlines()[1:] == [
        f"FROM --platform=$BUILDPLATFORM python:${{V}}-slim@{digest} AS deps",
        "FROM deps AS build",
        "FROM ghcr.io/x/y:1",
        "FROM scratch",
    ]


class FakeRegistry(BaseHTTPRequestHandler):
    """A registry with the anonymous token flow: manifests answer 401 with a Bearer challenge until asked
    with the token its realm hands out for the right scope."""

    manifest = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    send_digest = True
    requests: list[str] = []  # noqa: RUF012 (one test at a time)

    def log_message(self, *args: object) -> None:
        pass

    def _manifest(self, body: bool) -> None:
        FakeRegistry.requests.append(f"{self.command} {self.path}")
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path.startswith("/token?"):
            scope = "repository%3Alibrary%2Fpython%3Apull"
            token = "good" if f"scope={scope}" in self.path and "service=fake" in self.path else "bad"
            payload = json.dumps({"token": token}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path != "/v2/library/python/manifests/3.11-slim":
            self.send_error(404)
            return
        if self.headers.get("Authorization") != "Bearer good":
            self.send_response(401)
            challenge = f'Bearer realm="{host}/token",service="fake",scope="repository:library/python:pull"'
            self.send_header("WWW-Authenticate", challenge)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "application/vnd.oci.image.index.v1+json" not in self.headers.get("Accept", ""):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
        if FakeRegistry.send_digest:
            self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(self.manifest).hexdigest())
        self.send_header("Content-Length", str(len(self.manifest)))
        self.end_headers()
        if body:
            self.wfile.write(self.manifest)

    def do_HEAD(self) -> None:
        self._manifest(body=False)

    def do_GET(self) -> None:
        self._manifest(body=True)


@pytest.fixture
def registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeRegistry.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        FakeRegistry.send_digest = True


@pytest.mark.parametrize("send_digest", [True, False])
def test_lock_py_resolves_the_index_digest_with_an_anonymous_token(
    lockpy: ModuleType, registry: str, send_digest: bool
) -> None:
    FakeRegistry.send_digest = send_digest
    image = lockpy.ImageRef.parse("python:3.11-slim")
    digest, media_type = lockpy.resolve_digest(image, api=registry)
    assert digest == "sha256:" + hashlib.sha256(FakeRegistry.manifest).hexdigest()
    assert media_type == "application/vnd.oci.image.index.v1+json"
    assert any(r.startswith("GET /token?") for r in FakeRegistry.requests)
    with pytest.raises(Exception, match="404"):
        lockpy.resolve_digest(lockpy.ImageRef.parse("python:3.12-slim"), api=registry)


def test_lock_py_refresh_pins_keeps_and_drops_digests(
    lockpy: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolved tag is pinned and recorded; one that cannot be looked up again keeps its digest only
    while images.txt shows it was taken for that same tag; otherwise the FROM goes back to the tag."""
    dockerfile_path = tmp_path / "Dockerfile"
    dockerfile_path.write_text("ARG V=3.11\nFROM python:${V}-slim AS base\nFROM base AS app\n")
    monkeypatch.setattr(lockpy, "DOCKERFILES", (dockerfile_path,))
    monkeypatch.setattr(lockpy, "IMAGES", tmp_path / "images.txt")
    digest = "sha256:" + "2" * 64

    monkeypatch.setattr(lockpy, "resolve_digest", lambda image, api=None: (digest, "index"))
    assert lockpy.lock_images() == []
    assert f"FROM python:${{V}}-slim@{digest} AS base" in dockerfile_path.read_text()
    assert lockpy.read_images() == {"python:3.11-slim": digest}

    def unreachable(image: Any, api: str | None = None) -> tuple[str, str]:
        raise OSError("no route to host")

    monkeypatch.setattr(lockpy, "resolve_digest", unreachable)
    assert lockpy.lock_images() == []
    assert f"@{digest}" in dockerfile_path.read_text(), "kept: same tag, recorded"

    dockerfile_path.write_text(dockerfile_path.read_text().replace("V=3.11", "V=3.12"))
    unpinned = lockpy.lock_images()
    assert len(unpinned) == 1 and "python:3.12-slim" in unpinned[0] and "no route to host" in unpinned[0]
    assert "FROM python:${V}-slim AS base" in dockerfile_path.read_text(), (
        "a digest of another tag is dropped"
    )
    assert lockpy.read_images() == {"python:3.12-slim": "unresolved"}


def test_lock_py_carries_torch_hashes_forward_only_for_the_same_version(lockpy: ModuleType) -> None:
    def block(version: str, *hashes: str) -> str:
        lines = " \\\n".join(f"    --hash=sha256:{h * 64}" for h in hashes)
        return (
            f"six==1.17.0 \\\n    --hash=sha256:{'f' * 64}\ntorch=={version} \\\n{lines}\n    # via ferry\n"
        )

    merged = lockpy.carry_torch_hashes(block("2.13.0+cpu", "a"), block("2.13.0+cpu", "b"))
    assert parse_lock(merged)["torch"].hashes == ("a" * 64, "b" * 64)
    assert merged.endswith("    # via ferry\n")
    bumped = lockpy.carry_torch_hashes(block("2.14.0+cpu", "a"), block("2.13.0+cpu", "b"))
    assert parse_lock(bumped)["torch"].hashes == ("a" * 64,)


def test_make_lock_runs_lock_py_and_make_install_follows_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lock:.*\n\t.*scripts/lock\.py", makefile, re.MULTILINE)
    assert re.search(r"^\$\(STAMP\):.*\blocks/cpu-dev\.txt\b", makefile, re.MULTILINE), (
        "a lock change reinstalls"
    )
