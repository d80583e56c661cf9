"""The README stays true, checked against the running code rather than a hand-kept list:

- it starts with the two commands;
- its configuration table lists every setting Ferry reads (names derived from the Settings tree);
- its metrics table lists every metric Ferry exports, with its type and labels, and nothing else; the
  label values it names (and every ``metric{label="value"}`` the README and docs/ mention) are the ones
  a live Ferry exports after a scenario that makes each of them appear;
- its example requests, sent to a fresh ``make serve`` (demo models trained and registered from scratch),
  answer what it shows (floats to a tolerance: training is not bit-exact across CPUs).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    RedisServer,
    Registry,
    Server,
    _register,
    free_port,
    linear_module,
    log_torch,
    metric,
    register_code_model,
    start_server,
    stop_server,
    wait_until,
)
from delivery_support import setting_env_names, settings_from
from monitoring_support import register_fake_gpu
from service.api.app import create_app
from service.config import Settings
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
HERE = Path(__file__).resolve().parent


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make serve", "make test"]


def test_every_setting_is_in_the_configuration_table() -> None:
    names, _ = setting_env_names()
    names = {n for n in names if not any(other.startswith(n + "__") for other in names)}  # not sections
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", README.read_text(), flags=re.MULTILINE))
    aliases = {"FERRY_TRACKING_URI", "FERRY_REGISTRY_URI"}  # FERRY_ spellings of MLflow's own variables
    missing = sorted(names - documented - aliases)
    assert not missing, f"settings missing from README's configuration table: {missing}"
    stale = sorted(documented - names)
    assert not stale, f"README documents settings Ferry does not read: {stale}"


def _field(settings: Settings, name: str) -> Any:
    """The value of the setting an environment variable sets (``FERRY_BATCH__MAX_ROWS``: batch.max_rows)."""
    path = {"MLFLOW_TRACKING_URI": "tracking_uri", "MLFLOW_REGISTRY_URI": "registry_uri"}.get(name)
    value: Any = settings
    for part in (path or name.removeprefix("FERRY_").lower()).split("__"):
        value = getattr(value, part)
    return value


def default_problems(text: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where the configuration table's default column differs from what Ferry does with the variable
    unset: a default in backticks must parse (by Settings itself) to the built-in value; a default in
    words ("(none)", "first model") must be an unset (empty) value."""
    builtin = settings_from({}, monkeypatch)
    problems = []
    for name, default in re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", text, flags=re.MULTILINE):
        quoted = re.fullmatch(r"`([^`]*)`", default.strip())
        if quoted is None:
            if _field(builtin, name):
                problems.append(
                    f"{name}: README says {default.strip()}, Ferry's default is {_field(builtin, name)!r}"
                )
            continue
        documented = _field(settings_from({name: quoted[1]}, monkeypatch), name)
        if documented != _field(builtin, name):
            problems.append(f"{name}: README says {quoted[1]}, Ferry's default is {_field(builtin, name)!r}")
    return problems


def test_configuration_defaults_are_ferrys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_problems(README.read_text(), monkeypatch) == []


def test_configuration_default_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text().replace(
        "| `FERRY_BATCH__MAX_ROWS` | `64` |", "| `FERRY_BATCH__MAX_ROWS` | `32` |"
    )
    assert default_problems(text, monkeypatch) == [
        "FERRY_BATCH__MAX_ROWS: README says 32, Ferry's default is 64"
    ]
    text = README.read_text().replace("| `FERRY_DEVICE` | `auto` |", "| `FERRY_DEVICE` | (none) |")
    assert default_problems(text, monkeypatch) == [
        "FERRY_DEVICE: README says (none), Ferry's default is 'auto'"
    ]


# Metrics ------------------------------------------------------------------------------------------------

ENUM_LABELS = {"stage", "reason", "tier", "result", "operation", "protocol"}
"""Labels whose values are a fixed vocabulary the README spells out (the others carry names, versions,
routes or numbers)."""


@dataclass
class Row:
    """One line of README's metrics table."""

    names: list[str]
    type: str
    labels: set[str]
    values: set[str]
    """Label values named in the meaning column (backticked lowercase words)."""


def metrics_table(text: str) -> list[Row]:
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names, kind, labels, meaning = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append(
            Row(
                names=re.findall(r"`([^`]+)`", names),
                type=kind,
                labels={label.strip() for label in labels.split(",") if label.strip()},
                values=set(re.findall(r"`([a-z][a-z0-9_]*)`", meaning)),
            )
        )
    assert rows, "README has no metrics table under '## Metrics'"
    return rows


_SUFFIX = {"counter": "_total", "info": "_info"}


def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """{name as written in PromQL: (type, label names)} of everything a Ferry app exports: the metrics
    of service/metrics.py as ``create_app`` registers them, the process collectors, and the GPU
    collector on a fake device (real NVML is absent here)."""
    metrics = Metrics()
    create_app(Settings(), metrics)
    register_fake_gpu(metrics.registry)
    declared = {
        m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)
    }
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        labels = declared.get(family.name, set()) | {k for s in family.samples for k in s.labels}
        out[family.name + _SUFFIX.get(family.type, "")] = (family.type, labels - {"le", "quantile"})
    return out


def table_problems(text: str, exported: dict[str, tuple[str, set[str]]]) -> list[str]:
    """What README's metrics table gets wrong about ``exported``, in both directions."""
    rows = metrics_table(text)
    problems = []
    for row in rows:
        for name in row.names:
            if "*" in name:
                if not any(fnmatch.fnmatch(e, name) for e in exported):
                    problems.append(f"documented {name} matches no exported metric")
                continue
            if name not in exported:
                problems.append(f"documented {name} is not exported")
                continue
            kind, labels = exported[name]
            if row.type != kind:
                problems.append(f"{name} is a {kind}, the table says {row.type!r}")
            if row.labels != labels:
                problems.append(f"{name} has labels {sorted(labels)}, the table says {sorted(row.labels)}")
    patterns = [n for row in rows for n in row.names]
    for name in sorted(exported):
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            problems.append(f"exported {name} is missing from the table")
    return problems


def test_metrics_table_matches_what_ferry_exports() -> None:
    assert table_problems(README.read_text(), exported_metrics()) == []


def test_metrics_table_check_fails_both_ways() -> None:
    text, exported = README.read_text(), exported_metrics()
    without = "\n".join(line for line in text.splitlines() if "`ferry_model_reloads_total` |" not in line)
    assert "exported ferry_model_reloads_total is missing from the table" in table_problems(without, exported)
    invented = text.replace(
        "| `ferry_model_ready` |", "| `ferry_made_up_total` | counter | model | x |\n| `ferry_model_ready` |"
    )
    assert "documented ferry_made_up_total is not exported" in table_problems(invented, exported)
    relabelled = text.replace(
        "| `ferry_model_ready` | gauge | model |", "| `ferry_model_ready` | gauge | name |"
    )
    assert any("ferry_model_ready has labels" in p for p in table_problems(relabelled, exported))


_MENTION = re.compile(r"`((?:ferry|http)_[a-z0-9_]+)(?:\{([^`]*)\})?`")


def mentions(text: str) -> list[tuple[str, dict[str, set[str]]]]:
    """Every ``metric`` and ``metric{label="a|b"}`` (or ``label="a"|"b"``) in backticks."""
    out = []
    for name, selector in _MENTION.findall(text):
        labels: dict[str, set[str]] = {}
        for label, quoted in re.findall(r'(\w+)=((?:"[^"]*"\|?)+)', selector):
            labels[label] = {v for part in re.findall(r'"([^"]*)"', quoted) for v in part.split("|")}
        out.append((name, labels))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_metrics_the_docs_mention_are_exported(doc: Path) -> None:
    exported = exported_metrics()
    for name, labels in mentions(doc.read_text()):
        assert name in exported, f"{doc.name} mentions {name}, which Ferry does not export"
        assert set(labels) <= exported[name][1], f"{doc.name}: {name} has no label {set(labels)}"


# A live Ferry after a scenario that makes every documented label value appear.

NAN_MODEL = HERE / "nan_model.py"
EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4)


def _live_values(scrape: str) -> dict[tuple[str, str], set[str]]:
    """{(metric, label): values} of the enumerated labels in a /metrics text."""
    out: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        name = family.name + _SUFFIX.get(family.type, "")
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label in ENUM_LABELS:
                    out.setdefault((name, label), set()).add(value)
    return out


def label_value_problems(text: str, scrape: str) -> list[str]:
    """Label values the metrics table (if ``text`` has one) names that the live scrape lacks, and values
    the scrape has that the table does not name; and ``metric{label="value"}`` mentions in ``text``
    whose values the scrape lacks."""
    live = _live_values(scrape)
    problems = []
    for row in metrics_table(text) if "\n## Metrics\n" in text else []:
        enum = row.labels & ENUM_LABELS
        seen = {v for name in row.names for label in enum for v in live.get((name, label), set())}
        for value in sorted(row.values - seen):
            problems.append(f"{row.names[0]}: documented value {value!r} never appears in {sorted(enum)}")
        for value in sorted(seen - row.values):
            problems.append(f"{row.names[0]}: exported value {value!r} is not in the table")
    for name, labels in mentions(text):
        for label, values in labels.items():
            missing = values - live.get((name, label), set())
            if missing:
                problems.append(f"{name}{{{label}}}: mentioned {sorted(missing)} never appears")
    return problems


def _grpc_infer(target: str, model: str, row: list[float]) -> Any:
    """One gRPC ModelInfer with typed contents (the Open Inference Protocol over gRPC)."""
    import grpc

    from service.grpc import messages

    request = messages.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)]).contents.fp32_contents.extend(row)
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            f"/{messages.SERVICE}/ModelInfer",
            request_serializer=messages.ModelInferRequest.SerializeToString,
            response_deserializer=messages.ModelInferResponse.FromString,
        )
        return infer(request, timeout=30)


@pytest.fixture(scope="module")
def live_scrape(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a Ferry with Redis, after: requests in the three protocols (cache misses, a memory
    hit, a response-tier hit), models failing at each load stage (resolve, load, warmup), and an alias
    moved twice (one version swapped in, one rejected)."""
    import mlflow

    workdir = tmp_path_factory.mktemp("readme-metrics")
    redis = RedisServer(workdir)
    redis.start()
    mlflow.set_tracking_uri(registry.tracking_uri)
    with mlflow.start_run():
        _register("readme-follow", log_torch(linear_module(2.0), EXAMPLE), alias="champion")
    broken = workdir / "broken-model"  # resolves (a directory), then fails to load: stage="load"
    mlflow.pytorch.save_model(linear_module(), str(broken), serialization_format="pt2", input_example=EXAMPLE)
    (broken / "data" / "model.pt2").write_bytes(b"not a torch archive")
    models = (
        "linear=models:/linear@champion,follow=models:/readme-follow@champion,"
        f"ghost=models:/readme-ghost@champion,broken={broken}"
    )
    grpc_port = free_port()
    server = start_server(
        registry,
        models,
        workdir,
        {"FERRY_REDIS_URL": redis.url, "FERRY_RELOAD__POLL_S": "0.2", "FERRY_RELOAD__MAX_BACKOFF_S": "60"}
        | {"FERRY_GRPC_PORT": str(grpc_port)}
        | {"FERRY_CHALLENGER__MODE": "shadow"},  # linear@challenger: the challenger metrics' reasons
        wait_ready=False,
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def state(name: str) -> str:
                try:
                    return str(client.get(f"/models/{name}").json().get("state"))
                except httpx.TransportError:
                    return "down"

            assert wait_until(lambda: all(state(m) == "ready" for m in ("linear", "follow")), 120, 0.2), (
                server.log()
            )
            assert wait_until(lambda: all(state(m) == "failed" for m in ("ghost", "broken")), 60, 0.2)
            body = {"model": "linear", "inputs": [[1.0, 2.0, 3.0, 4.0]]}
            assert client.post("/predict", json=body).headers["x-cache"] == "miss"  # memory, redis miss
            assert client.post("/predict", json=body).headers["x-cache"] == "hit"  # response tier
            spaced = json.dumps(body, indent=1)  # other bytes, same request: memory tier
            headers = {"content-type": "application/json"}
            assert client.post("/predict", content=spaced, headers=headers).headers["x-cache"] == "hit"
            v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
            assert client.post("/v2/models/linear/infer", json=v2).status_code == 200
            # protocol="grpc" in the answered-requests metrics
            grpc_answer = _grpc_infer(f"127.0.0.1:{grpc_port}", "linear", [1.0, 2.0, 3.0, 4.0])
            assert grpc_answer.outputs[0].name == "output"
            assert (
                client.post("/models/linear/invocations", json={"inputs": [[1, 2, 3, 5]]}).status_code == 200
            )

            def reloads(result: str) -> float:
                scrape = client.get("/metrics").text
                return metric(scrape, "ferry_model_reloads_total", model="follow", result=result)

            with mlflow.start_run():
                _register("readme-follow", log_torch(linear_module(3.0), EXAMPLE), alias="champion")
            assert wait_until(lambda: reloads("swapped") >= 1, 60, 0.2), server.log()
            register_code_model(registry, "readme-follow", NAN_MODEL, EXAMPLE, {})  # warm-up gives NaN
            assert wait_until(lambda: reloads("rejected") >= 1, 60, 0.2), server.log()
            yield client.get("/metrics").text
    finally:
        stop_server(server)
        redis.kill()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_documented_label_values_are_what_a_live_ferry_exports(live_scrape: str) -> None:
    problems = [p for doc in DOCS for p in label_value_problems(doc.read_text(), live_scrape)]
    assert problems == []


@pytest.mark.integration
def test_label_value_check_fails_both_ways(live_scrape: str) -> None:
    text = README.read_text()
    assert "`memory`/`redis`/`response`" in text
    omitted = text.replace("`memory`/`redis`/`response`", "`memory`/`redis`")
    assert any("'response' is not in the table" in p for p in label_value_problems(omitted, live_scrape))
    invented = text.replace("`memory`/`redis`/`response`", "`memory`/`redis`/`response`/`disk`")
    assert any("'disk' never appears" in p for p in label_value_problems(invented, live_scrape))
    mentioned = text + '\n`ferry_model_reloads_total{result="retried"}`\n'
    assert any("['retried'] never appears" in p for p in label_value_problems(mentioned, live_scrape))


# README's example requests against a fresh `make serve` ------------------------------------------------

DEMO_MODELS = (
    "tabular-mlp-onnx=models:/tabular-mlp-onnx@champion,tabular-mlp=models:/tabular-mlp@champion,"
    "image-cnn=models:/image-cnn@champion"
)


@dataclass
class Example:
    """One ``$ curl ...`` of a console block and the output shown under it."""

    command: str
    output: str


def examples(text: str) -> list[Example]:
    out = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for chunk in re.split(r"^(?=\$ )", block, flags=re.MULTILINE):
            if not chunk.startswith("$ "):
                continue
            lines = chunk[2:].splitlines()
            command = []
            while lines:
                line = lines.pop(0)
                command.append(line.rstrip("\\").strip())
                if not line.endswith("\\"):
                    break
            out.append(Example(" ".join(command), "\n".join(lines).strip()))
    return out


def expand(body: str) -> str:
    """``[0.0, 0.01, ... 0.63]`` (an elided arithmetic series, with or without a note such as ``... 64
    values ...``) written out in full."""

    def series(match: re.Match[str]) -> str:
        first, second, last = float(match[1]), float(match[2]), float(match[3])
        count = round((last - first) / (second - first)) + 1
        return json.dumps([round(first + i * (second - first), 10) for i in range(count)])

    return re.sub(r"\[(-?[\d.]+), (-?[\d.]+),[^\[\]]*?\.\.\.[^\[\]]*?(-?[\d.]+)\]", series, body)


def send(base_url: str, command: str) -> httpx.Response:
    args = shlex.split(command)
    assert args[0] == "curl", command
    method, headers, data, url = "GET", {}, None, None
    words = iter(args[1:])
    for word in words:
        if word == "-H":
            key, value = next(words).split(":", 1)
            headers[key.strip()] = value.strip()
        elif word == "-d":
            method, data = "POST", expand(next(words))
        elif word.startswith("-"):
            assert set(word[1:]) <= {"s", "i"}, f"unknown curl option {word}"
        else:
            url = word
    assert url is not None and url.startswith("localhost:8000/"), command
    return httpx.request(method, base_url + url.removeprefix("localhost:8000"), headers=headers, content=data)


def _close(shown: Any, got: Any, where: str = "") -> list[str]:
    """Where ``got`` differs from ``shown``: floats to 2 % or 0.02 (retraining on another CPU moves the
    last digits), installed versions by name only (``onnxruntime 1.32.0``), everything else exactly."""
    if isinstance(shown, float) and isinstance(got, int | float):
        return [] if math.isclose(shown, got, rel_tol=0.02, abs_tol=0.02) else [f"{where}: {shown} != {got}"]
    if isinstance(shown, dict) and isinstance(got, dict):
        if shown.keys() != got.keys():
            return [f"{where}: keys {sorted(shown)} != {sorted(got)}"]
        return [p for k in shown for p in _close(shown[k], got[k], f"{where}.{k}")]
    if isinstance(shown, list) and isinstance(got, list):
        if len(shown) != len(got):
            return [f"{where}: {len(shown)} items != {len(got)}"]
        return [
            p for i, (s, g) in enumerate(zip(shown, got, strict=True)) for p in _close(s, g, f"{where}[{i}]")
        ]
    if isinstance(shown, str) and isinstance(got, str) and re.fullmatch(r"[a-z]+ \d+(\.\d+)+", shown):
        return [] if shown.split()[0] == got.split()[0] else [f"{where}: {shown!r} != {got!r}"]
    return [] if shown == got else [f"{where}: {shown!r} != {got!r}"]


def example_problems(example: Example, response: httpx.Response) -> list[str]:
    shown, where = example.output, example.command[:70]
    problems = []
    if shown.startswith("HTTP/"):
        head, _, shown = shown.partition("\n\n")
        status, *header_lines = head.splitlines()
        if int(status.split()[1]) != response.status_code:
            problems.append(f"{where}: status {response.status_code}, README shows {status}")
        for line in header_lines:
            key, value = (part.strip() for part in line.split(":", 1))
            if response.headers.get(key) != value:
                problems.append(f"{where}: {key}: {response.headers.get(key)}, README shows {value}")
    return problems + _close(json.loads(shown), response.json(), where)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`make serve` from scratch: the demo models trained and registered in a new registry (about a
    minute on 2 cores), then served on the CPU."""
    root = tmp_path_factory.mktemp("readme-demo")
    registry = Registry(root=root, tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    register = subprocess.run(
        [sys.executable, "-m", "service", "register-demo", "--models-dir", str(ROOT / "models")],
        cwd=root,
        env={**_plain_env(), **registry.env(), "FERRY_ARTIFACTS_DIR": str(root / "artifacts")},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert register.returncode == 0, register.stdout + register.stderr
    server = start_server(registry, DEMO_MODELS, root, {"FERRY_DEVICE": "cpu"})
    yield server
    stop_server(server)


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}


@pytest.mark.integration
@pytest.mark.timeout(1200)  # training the demo models takes 1 to 4 minutes on 2 busy cores
def test_readme_examples_answer_what_the_readme_shows(demo_server: Server) -> None:
    shown = examples(README.read_text())
    assert len(shown) >= 6, [e.command for e in shown]
    problems = []
    for example in shown:
        problems += example_problems(example, send(demo_server.url, example.command))
    assert problems == [], "\n".join(problems)
    first = next(e for e in shown if "x-cache: miss" in e.output)
    assert send(demo_server.url, first.command).headers["x-cache"] == "hit", "README: the same request hits"


def test_example_check_fails_on_another_registry_state() -> None:
    """The README as it was before a fresh `make serve` was checked: version "2", other outputs."""
    example = Example(
        "curl -s localhost:8000/models/tabular-mlp-onnx",
        '{"name":"tabular-mlp-onnx","version":"2","runtime":"onnxruntime 1.32.0","outputs":[[-3.7389634]]}',
    )
    fresh = httpx.Response(
        200,
        json={
            "name": "tabular-mlp-onnx",
            "version": "1",
            "runtime": "onnxruntime 1.99",
            "outputs": [[-3.609]],
        },
    )
    problems = example_problems(example, fresh)
    assert any("version: '2' != '1'" in p for p in problems), problems
    assert any("-3.7389634 != -3.609" in p for p in problems), problems
    assert not any("runtime" in p for p in problems), "installed versions compare by name"
    assert expand("[0.0, 0.01, 0.02, ... 64 values ..., 0.63]") == json.dumps([i / 100 for i in range(64)])
