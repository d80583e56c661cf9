"""Custom resources checked offline: the CRDs of the releases Ferry's manifests target, kept under
``tests/data/<project>-<version>/`` (tests/data/README.md says where each came from), turned into JSON
Schemas that validate like the API server's structural schema with strict field validation.

Imported by ``test_kserve.py`` and ``test_keda.py``. Nothing here is a test.

The conversion (OpenAPI v3 as Kubernetes uses it → JSON Schema draft 4, which OpenAPI 3.0 follows):
- an object with ``properties`` accepts no other field (``kubectl apply`` validates strictly by default:
  an unknown or misspelt field is an error), unless it says ``x-kubernetes-preserve-unknown-fields``;
- ``x-kubernetes-int-or-string`` is an integer or a string; ``nullable`` adds ``null``;
- ``x-kubernetes-embedded-resource`` objects take ``apiVersion``, ``kind`` and ``metadata`` too;
- ``x-kubernetes-list-type: set`` is ``uniqueItems``;
- ``x-kubernetes-validations`` (CEL) cannot run here: each rule is returned with where it applies, and
  the tests check the ones they meet by hand (and fail on a rule they do not know);
- annotations that change no validation (descriptions, defaults, formats such as ``int32``, list and
  map merge types) are dropped. Any other keyword is an error, so that no constraint is lost unnoticed.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).resolve().parents[1] / "data"
KSERVE = DATA / "kserve-v0.20.0"
"""KServe v0.20.0 (tag commit 1fb781055dd1567164358233e1125142ca6ef1fe)."""
KEDA = DATA / "keda-v2.20.2"
"""KEDA v2.20.2 (tag commit 68a5b5028f35b22d50597c69819ab32c4e92f21a)."""

_KEPT = {
    "type", "properties", "items", "required", "enum", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "uniqueItems", "multipleOf", "anyOf", "allOf", "oneOf", "not",
    "additionalProperties",
}  # fmt: skip
_DROPPED = {
    "description", "default", "format", "title", "example", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}  # fmt: skip
_HANDLED = {
    "nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource", "x-kubernetes-list-type", "x-kubernetes-validations",
}  # fmt: skip
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    """One YAML document (``.gz`` read through gzip); the C loader when PyYAML has it (the
    InferenceService CRD is 2 MB)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return yaml.load(raw, Loader=_LOADER)  # the C *safe* loader


@dataclass(frozen=True)
class Rule:
    """A CEL rule of the schema: where it applies (a JSON path of property names) and what it says."""

    path: tuple[str, ...]
    rule: str
    message: str


@dataclass(frozen=True)
class CrdSchema:
    group: str
    kind: str
    version: str
    schema: dict[str, Any]
    rules: tuple[Rule, ...]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def errors(self, doc: Any) -> list[str]:
        """Every way ``doc`` breaks the schema, as ``path: message`` (empty when it is valid)."""
        validator = jsonschema.Draft4Validator(self.schema)
        return sorted(
            f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in validator.iter_errors(doc)
        )


def convert(node: dict[str, Any], path: tuple[str, ...], rules: list[Rule]) -> dict[str, Any]:
    """One OpenAPI v3 schema node of a CRD as JSON Schema (see the module's docstring)."""
    unknown = set(node) - _KEPT - _DROPPED - _HANDLED
    if unknown:
        raise ValueError(f"{'.'.join(path) or '(root)'}: keywords this converter does not know: {unknown}")
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    for rule in node.get("x-kubernetes-validations", []):
        rules.append(Rule(path, rule["rule"], rule.get("message", "")))
    if "properties" in out:
        out["properties"] = {k: convert(v, (*path, k), rules) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = convert(out["items"], (*path, "[]"), rules)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = convert(out["additionalProperties"], (*path, "*"), rules)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [convert(v, path, rules) for v in out[key]]
    if "not" in out:
        out["not"] = convert(out["not"], path, rules)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            out["properties"].setdefault(field, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd(path: Path) -> CrdSchema:
    """The storage version of the CRD in ``path``, as a JSON Schema that also pins apiVersion and kind."""
    doc = load_yaml(path)
    assert doc["kind"] == "CustomResourceDefinition", path
    (version,) = [v for v in doc["spec"]["versions"] if v.get("storage")]
    rules: list[Rule] = []
    schema = convert(version["schema"]["openAPIV3Schema"], (), rules)
    group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
    }
    return CrdSchema(group, kind, version["name"], schema, tuple(rules))


def manifests(path: Path) -> list[dict[str, Any]]:
    """The documents of a manifest file, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
