"""``ferry check CANDIDATE``: load, run, measure, judge, report.

Both versions load through ``ModelSet`` as ``ferry serve`` loads them (``FERRY_`` settings: device,
allowed flavors, batcher, warm-up), under the names ``candidate`` and ``against``; the compared version
first, so that the candidate's memory growth is its own and not the framework's import. Each runs the
same rows through its own batcher: the whole data set in batches of ``FERRY_BATCH__MAX_ROWS`` for the
outputs, then ``--requests`` timed calls of 1 row and of ``FERRY_BATCH__MAX_ROWS`` rows, the two versions
taking turns call by call so that a noisy machine slows both alike.

Exit status: 0 every check passed; 1 a check failed, including a candidate that does not load or warm
up, that refuses the data set the compared version takes, or that fails on it (a report is written);
2 the check could not run: usage, an unknown model or version, an unreadable data set or policy file, a
registry that does not answer, or a compared version that does not load or run (nothing to judge the
candidate against).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service import __version__
from service.check import measure
from service.check.data import (
    DataError,
    Inputs,
    decode_frame,
    example_inputs,
    read_table,
    refit,
    split_labels,
)
from service.check.policy import Policy, evaluate, load_policy
from service.check.report import summary, write_report
from service.errors import ConfigurationError, FerryError, ModelNotFound

DEFAULT_ALIAS = "champion"
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@[^/]+|/[^/]+)$")


class UsageError(FerryError):
    """The check cannot run (exit 2)."""


@dataclass(frozen=True, slots=True)
class Options:
    candidate: str
    against: str | None = None
    data: str | None = None
    label: str | None = None
    report: str = "check-report"
    policy: str | None = None
    requests: int = 100


def run(options: Options) -> int:
    """The command: its exit status (see the module docstring); errors of the user's making are one line
    on stderr."""
    try:
        return asyncio.run(_check(options))
    except (UsageError, DataError) as exc:
        print(f"ferry check: {exc.message}", file=sys.stderr)
        return 2
    except FerryError as exc:  # the policy file, the settings, the registry
        print(f"ferry check: {exc.message}", file=sys.stderr)
        return 2


def against_uri(candidate: str, against: str | None) -> tuple[str | None, bool]:
    """The URI the candidate is compared with, and whether it was asked for (``False``: the default,
    ``models:/NAME@champion``, used only when that alias exists). ``against`` is an alias of the
    candidate's registered model (``champion``) or any model URI."""
    match = _REGISTERED.match(candidate)
    if against is None:
        return (f"models:/{match['name']}@{DEFAULT_ALIAS}" if match else None), False
    if ":" in against or against.startswith("/"):
        return against, True
    if match is None:
        raise UsageError(
            f"--against {against}: an alias needs a registered candidate (models:/NAME/VERSION or "
            "models:/NAME@ALIAS); give a model URI instead"
        )
    return f"models:/{match['name']}@{against}", True


async def _check(options: Options) -> int:
    from pydantic import ValidationError

    from service import logs
    from service.config import Settings, describe_invalid

    if options.requests < 1:
        raise UsageError("--requests must be at least 1")
    policy = load_policy(options.policy)
    compared, explicit = against_uri(options.candidate, options.against)
    models = [f"candidate={options.candidate}"] + ([f"against={compared}"] if compared else [])
    try:
        settings = Settings(models=models, default_model="candidate")
    except ValidationError as exc:
        raise UsageError(f"invalid settings:\n{describe_invalid(exc)}") from None
    logs.configure("warning", settings.log_format)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    frame = labels = None
    source = "the candidate's input example"
    if options.data is not None:
        frame, labels = split_labels(read_table(options.data), options.label, options.data)
        source = options.data
    elif options.label is not None:
        raise UsageError("--label names a column of --data: give a data set")

    from service.lifecycle import ModelSet
    from service.metrics import Metrics
    from service.registry import ModelRegistry

    registry = ModelRegistry(settings)
    try:
        model_set = ModelSet(settings, registry, Metrics(process=False))
    except ConfigurationError as exc:
        raise UsageError(exc.message) from None
    run = _Run(settings, policy, options, model_set)
    try:
        candidate_ref = await _resolve(registry, options.candidate, "candidate")
        against_ref = None
        if compared is not None:
            try:
                against_ref = await _resolve(registry, compared, "--against")
            except UsageError:
                if explicit:
                    raise
        return await run.go(candidate_ref, against_ref, frame, labels, source)
    finally:
        await model_set.close()


async def _resolve(registry: Any, uri: str, what: str) -> Any:
    try:
        return await asyncio.to_thread(registry.resolve, uri)
    except ModelNotFound as exc:
        raise UsageError(f"{what} {uri}: {exc.message}") from None


class _Run:
    """One check in progress: the loaded versions, the result as it fills."""

    def __init__(self, settings: Any, policy: Policy, options: Options, models: Any) -> None:
        self.settings, self.policy, self.options, self.models = settings, policy, options, models
        self.max_rows = int(settings.batch.max_rows)
        self.timeout_s = max(settings.batch.timeout_ms / 1000, 60.0)
        self.result: dict[str, Any] = {
            "ferry_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "batch_max_rows": self.max_rows,
            "requests": options.requests,
            "policy": {"file": options.policy, **policy.describe()},
            "candidate": {"uri": options.candidate},
            "against": None,
            "agreement": {},
            "checks": [],
        }

    async def go(self, candidate_ref: Any, against_ref: Any, frame: Any, labels: Any, source: str) -> int:
        result = self.result
        result["data"] = {
            "source": source,
            "label": self.options.label,
            "rows": None if frame is None else len(frame),
        }
        against = None
        if against_ref is not None:
            result["against"] = {"uri": against_ref.uri}
            try:
                against = await self._load("against", against_ref)
            except FerryError as exc:
                raise UsageError(
                    f"the compared version {against_ref.uri} does not load: {exc.message}"
                ) from None
        try:
            candidate = await self._load("candidate", candidate_ref)
        except ConfigurationError as exc:  # the settings, not the version (CUDA asked for, none here)
            raise UsageError(exc.message) from None
        except FerryError as exc:
            return self._fail("load", f"the candidate does not load: {exc.message}")
        gc.collect()
        gc.freeze()  # as ferry serve does after loading: full collections would be most of the p99

        against_inputs = None
        if against is not None:
            against_inputs = self._inputs(against, frame, source)
        try:
            candidate_inputs = self._inputs(candidate, frame, source)
        except DataError as exc:
            if against_inputs is None:
                raise
            return self._fail(
                "inputs", f"the candidate refuses data the compared version takes: {exc.message}"
            )
        if frame is None and against is not None:
            against_inputs = refit(against.model.inputs, candidate_inputs, source)
        result["data"]["rows"] = candidate_inputs.rows
        result["data"]["ignored_columns"] = candidate_inputs.ignored

        theirs: dict[str, np.ndarray] = {}
        if against is not None and against_inputs is not None:
            try:
                theirs = await self._outputs(against, against_inputs)
            except FerryError as exc:
                raise UsageError(f"the compared version fails on {source}: {exc.message}") from None
            result["against"] |= self._describe(against, theirs, labels)
        try:
            mine = await self._outputs(candidate, candidate_inputs)
        except FerryError as exc:
            return self._fail("predict", f"the candidate fails on {source}: {exc.message}")
        result["candidate"] |= self._describe(candidate, mine, labels)
        if against is not None:
            for name, other_name in _pairs(list(mine), list(theirs)):
                array, other = mine[name], theirs[other_name]
                if measure.shapes_match(array, other):
                    agreement = measure.compare(array, other, rtol=self.policy.rtol, atol=self.policy.atol)
                    if other_name != name:
                        agreement["compared_output"] = other_name
                    result["agreement"][name] = agreement
        try:
            await self._latency(candidate, candidate_inputs, against, against_inputs)
        except FerryError as exc:
            return self._fail("predict", f"a timed call failed: {exc.message}")
        result["checks"] = evaluate(result, self.policy)
        return self._finish()

    # -- steps -------------------------------------------------------------------------------------
    async def _load(self, name: str, ref: Any) -> Any:
        """Load and warm up one version through ``ModelSet``; its load time and memory growth."""
        gc.collect()
        before, started = _rss(), time.perf_counter()
        await self.models.load(name, ref=ref)
        elapsed = time.perf_counter() - started
        gc.collect()
        after = _rss()
        active = self.models.active(name)
        model, info = active.model, active.model.runtime.info
        self.result[name] |= {
            "version": ref.version,
            "source": ref.source,
            "flavor": model.flavor,
            "runtime": info.runtime,
            "device": info.device,
            "load_s": elapsed,
            "rss_delta_bytes": after - before if before is not None and after is not None else None,
            "signature": {
                "inputs": [s.describe() for s in model.inputs],
                "outputs": [s.describe() for s in model.outputs],
            },
        }
        return active

    def _inputs(self, active: Any, frame: Any, source: str) -> Inputs:
        model = active.model
        if frame is not None:
            return decode_frame(model.inputs, frame, source)
        inputs = example_inputs(model.inputs, model.input_example)
        if inputs is None:
            raise DataError(
                f"{model.ref.uri} logged no input example: give a data set (--data FILE) to run it on"
            )
        return inputs

    async def _outputs(self, active: Any, inputs: Inputs) -> dict[str, np.ndarray]:
        """Every row through the version's batcher, ``max_rows`` at a time."""
        parts = []
        for start in range(0, inputs.rows, self.max_rows):
            index = np.arange(start, min(inputs.rows, start + self.max_rows))
            answer = await active.batcher.submit(inputs.take(index), len(index), self.timeout_s)
            parts.append(answer.outputs)
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _describe(self, active: Any, outputs: dict[str, np.ndarray], labels: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outputs": [
                {
                    "name": n,
                    "dtype": a.dtype.name,
                    "shape": [-1, *a.shape[1:]],
                    "kind": measure.output_kind(a),
                }
                for n, a in outputs.items()
            ],
            "accuracy": None,
            "mean_abs_error": None,
            "label_output": None,
        }
        if labels is None:
            return out
        name = measure.label_output(outputs)
        if name is None:
            return out
        out["label_output"] = name
        predicted = measure.predicted_labels(outputs[name])
        if predicted is not None:
            out["accuracy"] = measure.accuracy(predicted, labels)
        elif labels.dtype.kind in "biuf":
            out["mean_abs_error"] = measure.mean_abs_error(outputs[name], labels)
        return out

    async def _latency(
        self, candidate: Any, candidate_inputs: Inputs, against: Any, against_inputs: Inputs | None
    ) -> None:
        """``requests`` calls of 1 row and of ``max_rows`` rows per version, taking turns."""
        turns = [("candidate", candidate, candidate_inputs)]
        if against is not None and against_inputs is not None:
            turns.append(("against", against, against_inputs))
        for rows in dict.fromkeys((1, self.max_rows)):
            samples: dict[str, list[float]] = {name: [] for name, _, _ in turns}
            for i in range(-2, self.options.requests):  # two untimed calls first
                for name, active, inputs in turns if i % 2 == 0 else turns[::-1]:
                    batch = inputs.take((np.arange(rows) + max(i, 0) * rows) % inputs.rows)
                    started = time.perf_counter()
                    await active.batcher.submit(batch, rows, self.timeout_s)
                    if i >= 0:
                        samples[name].append(time.perf_counter() - started)
            for name in samples:
                self.result[name].setdefault("latency", {})[f"batch_{rows}"] = measure.latency(
                    samples[name], rows
                )

    # -- verdict -----------------------------------------------------------------------------------
    def _fail(self, name: str, detail: str) -> int:
        self.result["checks"] = [
            {"name": name, "passed": False, "value": None, "limit": None, "detail": detail}
        ]
        return self._finish()

    def _finish(self) -> int:
        result = self.result
        result["passed"] = all(c["passed"] for c in result["checks"])
        folder = Path(self.options.report)
        try:
            files = write_report(folder, result)
        except OSError as exc:
            raise UsageError(f"cannot write the report to {folder}: {exc.strerror or exc}") from None
        print(summary(result, files))
        return 0 if result["passed"] else 1


def _pairs(mine: list[str], theirs: list[str]) -> list[tuple[str, str]]:
    """Which output of the compared version each candidate output is compared with: the one of the same
    name; when the names differ but the two have as many outputs, the one in the same position (an
    export that renamed ``output`` to ``logits`` is still compared, and the outputs check names the
    rename)."""
    same = [(n, n) for n in mine if n in theirs]
    if len(same) < len(mine) and len(mine) == len(theirs):
        return list(zip(mine, theirs, strict=True))
    return same


def _rss() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
