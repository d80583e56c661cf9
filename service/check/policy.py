"""The policy of ``ferry check``: thresholds read from a TOML file (``--policy``), and the checks they
make of a measured result.

Every key is optional; a file holds only what it changes (README, "Checking a version before
promotion"):

```toml
min_agreement = 0.99        # share of rows on which each output agrees with the compared version
max_accuracy_drop = 0.01    # compared version's accuracy minus the candidate's, against the labels
min_accuracy = 0.0          # the candidate's own accuracy against the labels (0: not checked)
max_error_ratio = 1.1       # a regression's mean absolute error against the labels, candidate / compared
max_p99_ratio = 1.5         # candidate p99 latency / compared p99, at batch 1 and at the batcher's max rows
min_p99_increase_ms = 1.0   # ... and only fails when the candidate's p99 is also this much higher
outputs_must_match = true   # the same output names, and the same shape per row
rtol = 1e-3                 # a float value agrees within atol + rtol * |compared value|
atol = 1e-6
```

Without a compared version only ``min_accuracy`` can fail (the rest compares two versions).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import FerryError


class PolicyError(FerryError):
    """A policy file that cannot be read or holds a key or value that is not a policy's."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The thresholds; the defaults are the documented ones."""

    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01
    min_accuracy: float = 0.0
    max_error_ratio: float = 1.1
    max_p99_ratio: float = 1.5
    min_p99_increase_ms: float = 1.0
    outputs_must_match: bool = True
    rtol: float = 1e-3
    atol: float = 1e-6

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SHARES = ("min_agreement", "max_accuracy_drop", "min_accuracy")
"""Keys that are shares of rows, between 0 and 1."""


def load_policy(path: str | Path | None) -> Policy:
    """The policy of a TOML file (``None``: the defaults). Unknown keys and values of the wrong type or
    out of range are refused by name: a typo must not silently loosen the gate."""
    if path is None:
        return Policy()
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise PolicyError(f"policy file {path}: cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"policy file {path}: not TOML: {exc}") from None
    fields = {f.name: f for f in dataclasses.fields(Policy)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PolicyError(f"policy file {path}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "outputs_must_match":
            if not isinstance(value, bool):
                raise PolicyError(f"policy file {path}: {key} must be true or false, not {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PolicyError(f"policy file {path}: {key} must be a number, not {value!r}")
        elif value < 0 or (key in _SHARES and value > 1):
            limits = "between 0 and 1" if key in _SHARES else "at least 0"
            raise PolicyError(f"policy file {path}: {key} must be {limits}, not {value!r}")
        values[key] = float(value) if key != "outputs_must_match" else value
    return Policy(**values)


def evaluate(result: dict[str, Any], policy: Policy) -> list[dict[str, Any]]:
    """The checks of a measured result (``command.py``'s ``result``): each ``{"name", "passed",
    "value", "limit", "detail"}``, in the order a reader goes through them."""
    checks: list[dict[str, Any]] = []
    candidate, against = result["candidate"], result.get("against")

    def check(name: str, passed: bool, value: Any, limit: Any, detail: str) -> None:
        checks.append(
            {"name": name, "passed": bool(passed), "value": value, "limit": limit, "detail": detail}
        )

    if policy.min_accuracy > 0 and candidate.get("accuracy") is not None:
        acc = candidate["accuracy"]
        check(
            "accuracy", acc >= policy.min_accuracy, acc, policy.min_accuracy,
            f"candidate accuracy {acc:.4f} (minimum {policy.min_accuracy:g})",
        )  # fmt: skip
    if against is None:
        return checks
    if policy.outputs_must_match:
        mine, theirs = _signature(candidate["outputs"]), _signature(against["outputs"])
        differences = _differences(mine, theirs)
        check(
            "outputs", not differences, mine, theirs,
            "; ".join(differences) if differences else "same output names and shapes",
        )  # fmt: skip
    for name, agreement in result.get("agreement", {}).items():
        share = agreement["agreement"]
        check(
            f"agreement.{name}", share >= policy.min_agreement, share, policy.min_agreement,
            f"output {name!r} ({agreement['kind']}) agrees on {share:.2%} of {agreement['rows']} rows "
            f"(minimum {policy.min_agreement:.2%})",
        )  # fmt: skip
    if candidate.get("accuracy") is not None and against.get("accuracy") is not None:
        drop = against["accuracy"] - candidate["accuracy"]
        check(
            "accuracy_drop", drop <= policy.max_accuracy_drop + 1e-12, drop, policy.max_accuracy_drop,
            f"accuracy {candidate['accuracy']:.4f} against {against['accuracy']:.4f} "
            f"(drop {drop:+.4f}, at most {policy.max_accuracy_drop:g})",
        )  # fmt: skip
    if candidate.get("mean_abs_error") is not None and against.get("mean_abs_error") is not None:
        mine_err, theirs_err = candidate["mean_abs_error"], against["mean_abs_error"]
        ratio = mine_err / theirs_err if theirs_err > 0 else (1.0 if mine_err <= policy.atol else math.inf)
        check(
            "error_ratio", mine_err <= theirs_err * policy.max_error_ratio + policy.atol, ratio,
            policy.max_error_ratio,
            f"mean absolute error {mine_err:.6g} against {theirs_err:.6g} (ratio at most "
            f"{policy.max_error_ratio:g})",
        )  # fmt: skip
    for key, mine_lat in candidate.get("latency", {}).items():
        theirs_lat = against.get("latency", {}).get(key)
        if not theirs_lat or mine_lat.get("p99_ms") is None or theirs_lat.get("p99_ms") is None:
            continue
        p99, base = mine_lat["p99_ms"], theirs_lat["p99_ms"]
        ratio = p99 / base if base > 0 else math.inf
        slower = ratio > policy.max_p99_ratio and p99 - base > policy.min_p99_increase_ms
        check(
            f"p99_ratio.{key}", not slower, ratio, policy.max_p99_ratio,
            f"p99 at {mine_lat['rows']} row(s) {p99:.2f} ms against {base:.2f} ms (x{ratio:.2f}, at most "
            f"x{policy.max_p99_ratio:g} or +{policy.min_p99_increase_ms:g} ms)",
        )  # fmt: skip
    return checks


def _signature(outputs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Output name -> shape of a row, as the versions answered the same inputs."""
    return {o["name"]: list(o["shape"])[1:] for o in outputs}


def _differences(mine: dict[str, list[int]], theirs: dict[str, list[int]]) -> list[str]:
    out = []
    if list(mine) != list(theirs):
        out.append(f"outputs {list(mine)} where the compared version has {list(theirs)}")
    for name in mine.keys() & theirs.keys():
        if mine[name] != theirs[name]:
            out.append(f"output {name!r} has rows of shape {mine[name]}, the compared version {theirs[name]}")
    return out
