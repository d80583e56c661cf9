#!/usr/bin/env python3
"""Move a model version through the registries: the steps of .github/workflows/promote.yml and
model-rollback.yml, runnable by hand with the same result.

Each subcommand works on the registry of ``MLFLOW_TRACKING_URI`` (with MLflow's own
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``), so that staging and production, separate servers
with their own credentials, are never open in the same step:

    promote.py has-alias NAME ALIAS            exit 0 when NAME@ALIAS exists, 1 when not
    promote.py challenger NAME VERSION         staging: NAME@challenger -> VERSION
    promote.py export NAME VERSION DIR         staging: VERSION's files and metadata into DIR
    promote.py champion DIR [--name NAME]      production: register DIR's model as a new version
                                               (once: a rerun finds it), @previous-champion -> the
                                               version @champion had, @champion -> the new one
    promote.py rollback NAME [--to VERSION]    production: @champion -> @previous-champion (or VERSION),
                                               @previous-champion removed, the demoted version tagged

A version moves between registries by its files, not by reference: ``export`` downloads them from
staging's artifact store, ``champion`` uploads them into a run of production's experiment
``ferry-promotions`` and registers that run's copy. MLflow's ``copy_model_version`` cannot do this
across servers (it registers the source's URI in the same registry), and a production version that
pointed into staging's store would break when staging is cleaned up or unreachable. The new version's
tags say where it came from (``ferry.source.*``) and carry the files' digest.

Each command prints one JSON object on stdout (the workflows read it); errors are one line on stderr
naming what is missing, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
"""The alias promotion sets on the version @champion had: what model-rollback.yml goes back to."""
EXPERIMENT = "ferry-promotions"
MANIFEST = "promotion.json"
MODEL_DIR = "model"
TAG_SOURCE_REGISTRY = "ferry.source.registry"
TAG_SOURCE_NAME = "ferry.source.name"
TAG_SOURCE_VERSION = "ferry.source.version"
TAG_SOURCE_RUN = "ferry.source.run_id"
TAG_DIGEST = "ferry.digest"
TAG_PROMOTED_AT = "ferry.promoted_at"
TAG_ROLLED_BACK_AT = "ferry.rolled_back_at"


class PromoteError(Exception):
    """A step cannot be done; the message says what is missing."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise PromoteError("MLFLOW_TRACKING_URI is not set: which registry?")
    return uri


def redacted(uri: str) -> str:
    """``uri`` without a password or token in its user info (it is written into tags and logs)."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def missing(err: Exception, alias: bool = False) -> bool:
    """Whether MLflow's error says the thing asked for is not there (an unknown alias is reported as
    INVALID_PARAMETER_VALUE, an unknown model or version as RESOURCE_DOES_NOT_EXIST)."""
    codes = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"} | ({"INVALID_PARAMETER_VALUE"} if alias else set())
    return getattr(err, "error_code", "") in codes


def version_of(mlflow_client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not version.isdigit():
        raise PromoteError(f"version must be a number, got {version!r}")
    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException as err:
        if missing(err):
            raise PromoteError(f"{name} version {version} is not in {redacted(tracking_uri())}") from None
        raise


def alias_version(mlflow_client: Any, name: str, alias: str) -> Any | None:
    """The version ``name@alias`` points at, or None (no such alias, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if missing(err, alias=True):
            return None
        raise


def digest(root: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``root``, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# Subcommands ---------------------------------------------------------------------------------------


def has_alias(name: str, alias: str) -> dict[str, Any]:
    found = alias_version(client(), name, alias)
    return {"name": name, "alias": alias, "version": str(found.version) if found else None}


def challenger(name: str, version: str) -> dict[str, Any]:
    c = client()
    version_of(c, name, version)
    before = alias_version(c, name, CHALLENGER)
    c.set_registered_model_alias(name, CHALLENGER, version)
    return {
        "registry": redacted(tracking_uri()),
        "name": name,
        "alias": CHALLENGER,
        "version": version,
        "previous": str(before.version) if before else None,
    }


def export(name: str, version: str, out: Path) -> dict[str, Any]:
    """Download VERSION's files into ``out/model`` and describe them in ``out/promotion.json``."""
    import mlflow

    c = client()
    mv = version_of(c, name, version)
    if out.exists() and any(out.iterdir()):
        raise PromoteError(f"{out} is not empty: export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    source_uri = c.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source_uri, dst_path=tmp, tracking_uri=tracking_uri()
            )
        )
        if not (local / "MLmodel").is_file():
            raise PromoteError(f"{name} version {version} ({source_uri}) has no MLmodel file: not a model")
        local.rename(out / MODEL_DIR)
    manifest = {
        "registry": redacted(tracking_uri()),
        "name": name,
        "version": str(mv.version),
        "run_id": mv.run_id or "",
        "source": mv.source or "",
        "description": mv.description or "",
        "tags": dict(mv.tags or {}),
        "digest": digest(out / MODEL_DIR),
        "exported_at": now(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file() or not (folder / MODEL_DIR / "MLmodel").is_file():
        raise PromoteError(f"{folder} holds no export ({MANIFEST} and {MODEL_DIR}/MLmodel): run export first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    for key in ("registry", "name", "version", "digest"):
        if not manifest.get(key):
            raise PromoteError(f"{path}: field {key!r} is missing")
    if digest(folder / MODEL_DIR) != manifest["digest"]:
        raise PromoteError(f"{folder / MODEL_DIR} does not match the digest in {path}: export again")
    return manifest


def registered_copy(c: Any, name: str, manifest: dict[str, Any]) -> Any | None:
    """A version of ``name`` already registered from this export (same source and files), if any."""
    found = c.search_model_versions(
        f"name = '{name}' and tag.`{TAG_DIGEST}` = '{manifest['digest']}'", max_results=100
    )
    for mv in found:
        tags = mv.tags or {}
        if (
            tags.get(TAG_SOURCE_REGISTRY) == manifest["registry"]
            and tags.get(TAG_SOURCE_VERSION) == manifest["version"]
        ):
            return mv
    return None


def register_copy(
    c: Any, name: str, folder: Path, manifest: dict[str, Any], artifact_location: str | None
) -> Any:
    """Upload the export's files into a run of ``ferry-promotions`` and register them as a new version."""
    from mlflow.exceptions import MlflowException

    experiment = c.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else c.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    )
    try:
        c.get_registered_model(name)
    except MlflowException as err:
        if not missing(err):
            raise
        c.create_registered_model(name, description=manifest.get("description") or None)
    tags = {
        TAG_SOURCE_REGISTRY: manifest["registry"],
        TAG_SOURCE_NAME: manifest["name"],
        TAG_SOURCE_VERSION: manifest["version"],
        TAG_SOURCE_RUN: manifest.get("run_id", ""),
        TAG_DIGEST: manifest["digest"],
        TAG_PROMOTED_AT: now(),
    }
    run = c.create_run(
        experiment_id, run_name=f"{name}-from-{manifest['name']}-v{manifest['version']}", tags=tags
    )
    try:
        c.log_artifacts(run.info.run_id, str(folder / MODEL_DIR), MODEL_DIR)
    except BaseException:
        c.set_terminated(run.info.run_id, "FAILED")
        raise
    c.set_terminated(run.info.run_id, "FINISHED")
    version_tags = {
        **{k: v for k, v in (manifest.get("tags") or {}).items() if not k.startswith("ferry.source.")},
        **tags,
    }
    mv = c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_DIR}",
        run_id=run.info.run_id,
        tags=version_tags,
        description=manifest.get("description") or None,
    )
    for _ in range(600):  # a registry with asynchronous model version creation; sqlite is READY at once
        if str(mv.status) == "READY":
            return mv
        if str(mv.status) == "FAILED_REGISTRATION":
            raise PromoteError(f"{name} version {mv.version} failed to register: {mv.status_message}")
        time.sleep(1)
        mv = c.get_model_version(name, mv.version)
    raise PromoteError(f"{name} version {mv.version} is still {mv.status} after 10 minutes")


def champion(folder: Path, name: str | None, artifact_location: str | None) -> dict[str, Any]:
    manifest = read_manifest(folder)
    target = name or manifest["name"]
    c = client()
    mv = registered_copy(c, target, manifest)
    reused = mv is not None
    if mv is None:
        mv = register_copy(c, target, folder, manifest, artifact_location)
    version = str(mv.version)
    before = alias_version(c, target, CHAMPION)
    previous = str(before.version) if before is not None and str(before.version) != version else None
    if previous is not None:
        # First the way back, then the move: a failure between the two leaves @champion where it was.
        c.set_registered_model_alias(target, PREVIOUS, previous)
    c.set_registered_model_alias(target, CHAMPION, version)
    return {
        "registry": redacted(tracking_uri()),
        "name": target,
        "version": version,
        "alias": CHAMPION,
        "previous": previous,
        "already_registered": reused,
        "source": {
            "registry": manifest["registry"],
            "name": manifest["name"],
            "version": manifest["version"],
        },
    }


def rollback(name: str, to: str | None) -> dict[str, Any]:
    c = client()
    current = alias_version(c, name, CHAMPION)
    if to is None:
        previous = alias_version(c, name, PREVIOUS)
        if previous is None:
            raise PromoteError(
                f"{name} has no @{PREVIOUS} in {redacted(tracking_uri())}: nothing recorded to roll back to "
                "(it is set by a promotion and removed by a rollback); name a version with --to"
            )
        to = str(previous.version)
    else:
        version_of(c, name, to)
    if current is not None and str(current.version) == to:
        raise PromoteError(f"{name}@{CHAMPION} is already version {to}")
    c.set_registered_model_alias(name, CHAMPION, to)
    if alias_version(c, name, PREVIOUS) is not None:
        # Gone once used: a second rollback must not flip back to the version just demoted.
        c.delete_registered_model_alias(name, PREVIOUS)
    if current is not None:
        c.set_model_version_tag(name, str(current.version), TAG_ROLLED_BACK_AT, now())
    return {
        "registry": redacted(tracking_uri()),
        "name": name,
        "alias": CHAMPION,
        "version": to,
        "demoted": str(current.version) if current is not None else None,
    }


# Command line --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promote.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("has-alias", help="exit 0 when NAME@ALIAS exists, 1 when not")
    s.add_argument("name")
    s.add_argument("alias")
    s = sub.add_parser("challenger", help="set NAME@challenger to VERSION")
    s.add_argument("name")
    s.add_argument("version")
    s = sub.add_parser("export", help="download VERSION's files and metadata into DIR")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("dir", type=Path)
    s = sub.add_parser("champion", help="register an export as a new version and make it @champion")
    s.add_argument("dir", type=Path)
    s.add_argument("--name", help="the registered model's name here (default: the source's)")
    s.add_argument(
        "--artifact-location",
        default=os.environ.get("PROMOTE_ARTIFACT_LOCATION") or None,
        help=f"where a new {EXPERIMENT} experiment keeps its files (default: the server decides)",
    )
    s = sub.add_parser("rollback", help=f"move NAME@champion back to @{PREVIOUS} (or --to VERSION)")
    s.add_argument("name")
    s.add_argument("--to", help="the version to go back to, instead of @previous-champion")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        # MLflow prints to stdout ("View run ... at"): stdout carries only the result's JSON.
        with contextlib.redirect_stdout(sys.stderr):
            if args.command == "has-alias":
                result = has_alias(args.name, args.alias)
            elif args.command == "challenger":
                result = challenger(args.name, args.version)
            elif args.command == "export":
                result = export(args.name, args.version, args.dir)
            elif args.command == "champion":
                result = champion(args.dir, args.name, args.artifact_location)
            else:
                result = rollback(args.name, args.to)
    except (PromoteError, MlflowException) as err:
        print(f"promote.py {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    if args.command == "has-alias" and result["version"] is None:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
