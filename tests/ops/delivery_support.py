"""Helpers shared by the delivery tests: Dockerfiles, .dockerignore, workflows, Kustomize, settings.

Imported by ``test_docker.py``, ``test_workflows.py``, ``test_k8s.py`` and ``test_drift.py``. Nothing
here is a test. Each parser is small and deliberately strict: what it does not understand, it reports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import AliasChoices, BaseModel

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
WORKFLOWS_DIR = ROOT / ".github" / "workflows"
DEPENDABOT = ROOT / ".github" / "dependabot.yml"
DEPLOY = ROOT / "deploy"
OVERLAYS = {"staging": DEPLOY / "overlays" / "staging", "production": DEPLOY / "overlays" / "production"}
ADAPTER_VALUES = DEPLOY / "cluster" / "prometheus-adapter-values.yaml"
INSTALL_SCRIPT = ROOT / "scripts" / "install.sh"
DELIVERY_DOC = ROOT / "docs" / "delivery.md"

UID = 10001
"""The images' fixed non-root user and group."""
PORT = 8000
"""The port Ferry listens on inside every container."""
GRPC_PORT = 8001
"""The images' gRPC port (FERRY_GRPC_PORT), Triton's."""
SERVE_CMD = ["ferry", "serve"]
"""The images' CMD: no flags, the host and ports come from their ENV (a flag would override FERRY_PORT)."""


# Tools ---------------------------------------------------------------------------------------------


def tool(name: str, hint: str) -> str:
    """A command's path, next to this Python first (the venv's bin); fails, does not skip, with a hint."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: {hint}")
    return path


def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; stdout and stderr merged in ``.stdout``."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


# Dockerfiles ---------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]
    """Global ARGs (before the first FROM) with their defaults."""
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        out = [stage]
        while (parent := self.stage(out[-1].base)) is not None and parent not in out:
            out.append(parent)
        return out

    def effective(self, stage: Stage, keyword: str) -> Instruction | None:
        """The last ``keyword`` instruction in force in ``stage`` (inherited from parent stages too)."""
        for s in self.chain(stage):
            found = s.all(keyword)
            if found:
                return found[-1]
        return None

    def env(self, stage: Stage) -> dict[str, str]:
        """ENV in force in ``stage`` (``KEY=VALUE`` forms)."""
        out: dict[str, str] = {}
        for s in reversed(self.chain(stage)):
            for inst in s.all("ENV"):
                out.update(env_pairs(inst.value))
        return out

    def expand(self, text: str) -> str:
        """``${ARG}`` and ``$ARG`` replaced by the global ARGs' defaults."""
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group()), text
        )


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with line continuations joined and comments dropped; heredocs are not supported."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        logical.append((start, buf.strip()))
        buf = ""
    if buf:
        logical.append((start, buf.strip()))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if "<<" in value and keyword == "RUN":
            raise ValueError(f"line {number}: heredocs are not supported by this parser")
        if keyword == "FROM":
            parts = [p for p in value.split() if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = value.partition("=")
                args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(args, stages)


def env_pairs(value: str) -> dict[str, str]:
    """``ENV A=1 B="two words"`` as a dict (the legacy ``ENV A 1`` form too)."""
    if "=" not in value.split()[0]:
        key, _, rest = value.partition(" ")
        return {key: rest.strip()}
    out = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', value):
        out[match.group(1)] = match.group(2).strip('"')
    return out


@cache
def dockerfile(variant: str) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[variant].read_text())


def json_form(value: str) -> list[str] | None:
    """The list of a JSON-form CMD/ENTRYPOINT, or None for the shell form."""
    import json

    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed) else None


def final_stage_problems(df: Dockerfile) -> list[str]:
    """What is wrong with the shipped (last) stage: non-root UID, health check, CMD, unbuffered output."""
    problems = []
    final = df.stages[-1]
    user = df.effective(final, "USER")
    uid = user.value.split(":")[0] if user else None
    if uid is None:
        problems.append("the final stage sets no USER: it would run as root")
    elif not uid.isdigit():
        problems.append(f"USER {user.value if user else ''}: use a numeric UID (runAsNonRoot checks it)")
    elif int(uid) == 0:
        problems.append("USER 0: the final stage runs as root")
    health = df.effective(final, "HEALTHCHECK")
    if health is None or "/health/live" not in health.value:
        problems.append("no HEALTHCHECK on /health/live in the final stage")
    else:
        match = re.search(r"--start-period=(\d+)s", health.value)
        if not match or int(match.group(1)) < 60:
            problems.append("HEALTHCHECK needs --start-period of at least 60s (model loading)")
    cmd = df.effective(final, "CMD")
    if cmd is None or json_form(cmd.value) != SERVE_CMD:
        problems.append(f"CMD must be the JSON form {SERVE_CMD}, got {cmd.value if cmd else None!r}")
    if df.effective(final, "ENTRYPOINT") is not None:
        problems.append("an ENTRYPOINT would wrap ferry (a shell one would swallow SIGTERM)")
    if df.env(final).get("PYTHONUNBUFFERED") != "1":
        problems.append("PYTHONUNBUFFERED=1 is not set in the final stage")
    return problems


# .dockerignore -------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + "$")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, pattern) in file order; the last matching rule wins, as in Docker."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/") or "."
        rules.append((not negate, _pattern_regex(pattern)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a repository path reaches the build context: a rule matching the path or one of its
    parent folders decides, the last such rule winning."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = exclude
    return not excluded


# Workflows -----------------------------------------------------------------------------------------


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.yml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    """The ``on:`` mapping (YAML 1.1 reads the bare key ``on`` as True)."""
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on or {})


def steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(job id, step) for every step of every job."""
    return [(job_id, step) for job_id, job in workflow["jobs"].items() for step in job.get("steps", [])]


def needs(job: dict[str, Any]) -> list[str]:
    """A job's ``needs`` as a list (YAML allows one string)."""
    value = job.get("needs", [])
    return [value] if isinstance(value, str) else list(value)


def upstream(workflow: dict[str, Any], job_id: str) -> set[str]:
    """Every job ``job_id`` waits for, directly or through the jobs it needs."""
    seen: set[str] = set()
    todo = needs(workflow["jobs"][job_id])
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(needs(workflow["jobs"][current]))
    return seen


_SECRET_REF = re.compile(r"\bsecrets\.([A-Za-z_][A-Za-z0-9_]*)")


def secrets_used(node: Any) -> set[str]:
    """The names of every ``secrets.NAME`` in the expressions of a workflow fragment."""
    return set(_SECRET_REF.findall(yaml.safe_dump(node, width=10_000)))


def step_named(job: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The one step of ``job`` whose name starts with ``prefix``."""
    found = [s for s in job.get("steps", []) if str(s.get("name", "")).startswith(prefix)]
    assert len(found) == 1, f"expected one step named {prefix!r}..., found {len(found)}"
    return found[0]


# Kustomize -----------------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    """``kustomize build`` or ``kubectl kustomize`` (kubectl carries kustomize built in)."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    pytest.fail("neither kustomize nor kubectl is installed: install kubectl (it renders deploy/overlays)")


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay rendered by Kustomize itself, as resources."""
    result = run(*kustomize_command(), OVERLAYS[overlay])
    if result.returncode != 0:
        raise AssertionError(f"kustomize failed for {overlay}:\n{result.stdout}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def resources(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(overlay) if doc["kind"] == kind]


def one(overlay: str, kind: str) -> dict[str, Any]:
    found = resources(overlay, kind)
    assert len(found) == 1, f"{overlay}: expected one {kind}, found {len(found)}"
    return found[0]


def container(overlay: str) -> dict[str, Any]:
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "ferry")


def selector_matches(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


# Settings ------------------------------------------------------------------------------------------


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The settings section a field holds (itself or inside Optional), if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(get_origin(a) is dict for a in (annotation, *get_args(annotation)))


def setting_env_names() -> tuple[set[str], set[str]]:
    """Every environment variable Ferry's Settings reads, derived from ``Settings.model_fields``
    recursively: (exact names, prefixes of mappings whose keys are free, like FERRY_CACHE__MODELS__)."""
    from service.config import Settings

    prefix = str(Settings.model_config.get("env_prefix", "")).upper()
    delimiter = str(Settings.model_config.get("env_nested_delimiter") or "__")
    names: set[str] = set()
    open_prefixes: set[str] = set()

    def walk(model: type[BaseModel], base: str, top: bool) -> None:
        for name, info in model.model_fields.items():
            alias = info.validation_alias
            if top and isinstance(alias, AliasChoices):
                env_names = [c.upper() for c in alias.choices if isinstance(c, str)]
            elif top and isinstance(alias, str):
                env_names = [alias.upper()]
            else:
                env_names = [f"{base}{name.upper()}"]
            names.update(env_names)
            nested = _model_type(info.annotation)
            for env_name in env_names:
                if _is_mapping(info.annotation):  # {"image-cnn": {...}}: any key below this prefix
                    open_prefixes.add(env_name + delimiter)
                elif nested is not None:
                    walk(nested, env_name + delimiter, top=False)

    walk(Settings, prefix, top=True)
    return names, open_prefixes


def install_script_variables() -> set[str]:
    """The FERRY_* variables scripts/install.sh reads (they configure the install, not the server)."""
    return set(re.findall(r"\$\{?(FERRY_[A-Z0-9_]+)", INSTALL_SCRIPT.read_text()))


def is_setting(name: str) -> bool:
    names, prefixes = setting_env_names()
    return name in names or any(name.startswith(p) and len(name) > len(p) for p in prefixes)


def settings_from(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Ferry's Settings as a process with exactly this FERRY_*/MLFLOW_* environment would build them."""
    from service.config import Settings

    for key in list(os.environ):
        if key.startswith(("FERRY_", "MLFLOW_")):
            monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    return Settings()
