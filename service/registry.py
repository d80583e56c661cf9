"""MLflow: resolve a model location to a version, download it, read its signature, build a ``Runtime``.

The only module of Ferry that imports mlflow. ``MLFLOW_TRACKING_URI`` (a sqlite file, PostgreSQL or an
MLflow server) is the registry. A served model comes from one of these locations, all through
``ModelSpec.parse`` → ``ModelRegistry.resolve`` → ``ModelRegistry.load``:

- ``models:/NAME@ALIAS``, ``models:/NAME/3``: version ``3`` (the registry's number), source
  ``models:/NAME/3``, copied to ``models/NAME/3``.
- ``runs:/RUN/PATH``: version ``run-<first 8 of RUN>``, source ``runs:/RUN/PATH``, copied to
  ``runs/RUN/PATH``.
- a model directory (``/abs/path`` or ``file:///abs/path``): version and source ``sha-<12 hex>``, its
  ``content_digest``; loaded in place, never copied.
- any other artifact URI MLflow can download (``s3://``, ``gs://``, ``https://``, ``mlflow-artifacts:/``,
  ...): version and source ``sha-<12 hex>``, the ``content_digest`` of its files, copied to
  ``content/<12 hex>``.

Local copies live under ``Settings.download_dir`` and are named by what they hold, never by the name a
model is served under: re-pointing a served name at another registered model with the same version
number downloads that model's own files.

What re-resolving costs (the reloader does it every ``FERRY_RELOAD__POLL_S``): ``models:/`` one registry
call; ``runs:/`` one call (the run must still exist; a run's artifacts are written once, so its id names
its content); a directory one ``stat`` per file, and a re-hash of the files whose size, mtime or inode
changed; a remote artifact URI one recursive listing (paths and sizes), and a full download into a
staging folder only when the listing differs from the last one (a rewrite that keeps every path and size
goes unseen until Ferry restarts: give a new model a new URI). A directory that is rewritten in place
can be digested half-written; write the new model beside it and rename it into place, so a poll sees
either the old files or the new ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from service.columns import DTYPES, POSITIONAL, column_spec, decode_inputs, is_table
from service.config import Settings
from service.errors import (
    ConfigurationError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    RegistryUnavailable,
)
from service.runtime.base import Runtime, TensorSpec, resolve_device

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)/(?P<path>.+)$")
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SQL_STORES = ("postgresql", "mysql", "mssql")
"""MLflow's database stores that a server runs elsewhere (sqlite is a local file)."""
_SERVED_FORMS = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, an absolute directory path, "
    "file:///PATH or an artifact URI MLflow can download (s3://, gs://, https://, mlflow-artifacts:/, ...)"
)
_LOADER = threading.Lock()
"""Held while MLflow's flavor loaders run, across every model of the process. They keep process-wide
state that two loads at once corrupt: ``torch.export.load`` (MLflow's ``pt2`` PyTorch format) sets a
module-global deserializer and fails a second one ("_CURRENT_DESERIALIZER is already set"); a
models-from-code pyfunc hands its model over in ``mlflow.models.model.__mlflow_model__``, so a second
load in between gives the first one the wrong model; pyfunc loading also edits ``sys.path`` for a model's
code and clears a global dependency schema. ONNX models load through ONNX Runtime, whose sessions are
built independently, and downloads hold no global state: neither takes the lock."""


def local_path(uri: str) -> Path | None:
    """The directory a local location names (``/abs/path`` or ``file:///abs/path``), else ``None``."""
    if uri.startswith("/"):
        return Path(uri)
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigurationError(f"model URI {uri!r}: a file:// URI names a local path, not a host")
        return Path(unquote(parsed.path))
    return None


def _artifact_schemes() -> set[str]:
    from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

    return {s for s in get_registered_artifact_repositories() if s not in ("", "file", "models", "runs")}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One configured model: the name it is served under and where it comes from."""

    name: str
    uri: str

    @classmethod
    def parse(cls, entry: str) -> ModelSpec:
        """``name=URI`` or ``URI``. Without a name, a registry URI gives the registered model's name and
        any other location the last component of its path (``/mnt/models/fraud`` → ``fraud``)."""
        name, sep, uri = entry.partition("=")
        if not sep or ":" in name or "/" in name:  # no name, or an "=" inside the URI (``?x=1``)
            name, uri = "", entry
        uri, name = uri.strip(), name.strip()
        if match := _MODELS_URI.match(uri):
            name = name or match["name"]
        elif match := _RUNS_URI.match(uri):
            name = name or match["path"].rstrip("/").rsplit("/", 1)[-1]
        elif (path := local_path(uri)) is not None:
            if not path.is_absolute():
                raise ConfigurationError(f"model path {uri!r} must be absolute", uri=uri)
            name = name or path.name
        elif (scheme := _SCHEME.match(uri)) is not None and scheme["scheme"].lower() in _artifact_schemes():
            name = name or urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1]
        else:
            raise ConfigurationError(f"model URI {uri!r} is not {_SERVED_FORMS}", uri=uri)
        if not _NAME.match(name):
            raise ConfigurationError(
                f"model name {name!r} must be letters, digits, '.', '_' or '-' (give one: NAME=URI)"
            )
        return cls(name=name, uri=uri)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A location resolved to one immutable version."""

    uri: str
    """The location as configured (``models:/fraud@champion``)."""
    alias: str | None
    version: str
    """What users see (``X-Model-Version``, metrics): ``3``, ``run-0123abcd`` or ``sha-<12 hex>``."""
    download_uri: str
    """What MLflow downloads (``models:/fraud/3``, ``runs:/…``, the artifact URI; a directory's path)."""
    source: str = ""
    """What was resolved, unique across registered models, runs and contents: ``models:/NAME/VERSION``,
    ``runs:/RUN/PATH`` or ``sha-<12 hex>`` (defaults to ``download_uri``). Two refs with one source
    hold the same files; caches keyed on a served model should include it."""
    path: str | None = None
    """The directory the model is loaded from in place (a local model), else ``None``."""

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", self.download_uri)


@dataclass(slots=True)
class LoadedModel:
    """A model version on its device, with what the registry knows about it."""

    name: str
    ref: ModelRef
    flavor: str
    runtime: Runtime
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    input_example: dict[str, np.ndarray] | None


_FileState = tuple[int, int, int, str]
"""A file's size, mtime (ns), inode and SHA-256: the last three say whether it must be read again."""


def content_digest(root: Path) -> str:
    """The version of a model that has no registry version: ``sha-`` and the first 12 hex digits of a
    SHA-256 over one line per regular file under ``root``, in sorted order of its relative POSIX path:
    ``<path> NUL <size in bytes> NUL <SHA-256 hex of its bytes> LF``. Where the folder lies, its name,
    mtimes, permissions and empty folders do not count, so the same files give the same version on any
    machine and after any copy; symbolic links to files count as the file, links to folders are not
    followed."""
    return _digest(root, {})[0]


def _digest(root: Path, known: Mapping[str, _FileState]) -> tuple[str, dict[str, _FileState]]:
    """``content_digest``, reading only the files whose size, mtime or inode differ from ``known`` (what
    the last call on this folder returned as its second value)."""
    files: dict[str, _FileState] = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for file in names:
            full = Path(folder, file)
            stat = full.stat()
            if not full.is_file():
                continue
            rel = full.relative_to(root).as_posix()
            before = known.get(rel)
            if before is not None and before[:3] == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
                files[rel] = before
                continue
            sha = hashlib.sha256()
            with full.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            files[rel] = (stat.st_size, stat.st_mtime_ns, stat.st_ino, sha.hexdigest())
    total = hashlib.sha256()
    for rel in sorted(files):
        total.update(f"{rel}\0{files[rel][0]}\0{files[rel][3]}\n".encode())
    return f"sha-{total.hexdigest()[:12]}", files


class ModelRegistry:
    """Talks to MLflow for one Ferry process."""

    def __init__(self, settings: Settings) -> None:
        import mlflow

        self._settings = settings
        # MLflow retries an unreachable server for minutes by default; a look-up that fails should fail
        # in seconds, so the reloader reports it and tries again at its next poll. Explicit settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        # MLflow 3 deserializes pickle (and skops, cloudpickled pyfunc models, pickled PyTorch) unless
        # told not to: whoever can move an alias would run code in every replica. Refused unless the
        # operator sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true (README, Security).
        os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        mlflow.set_tracking_uri(settings.tracking_uri)
        if settings.registry_uri:
            mlflow.set_registry_uri(settings.registry_uri)
        self._download_dir = Path(settings.download_dir)
        self._client_lock = threading.Lock()
        self._client: Any = None
        self._directories: dict[Path, dict[str, _FileState]] = {}
        """Per local model directory, its files as last digested (so a poll re-reads only changes)."""
        self._remote: dict[str, tuple[str, str]] = {}
        """Per remote artifact URI, the fingerprint of its last listing and the version it gave."""

    def mlflow_client(self) -> Any:
        """MLflow's client, built on first use. Building it opens a database store at once, and MLflow
        retries a database that refuses it for about 100 s; so each database store is probed first, and
        one that is down or refuses Ferry fails in seconds, with the database's own message."""
        with self._client_lock:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                tracking, registry = self._settings.tracking_uri, self._settings.registry_uri
                for uri in dict.fromkeys((tracking, registry or tracking)):
                    _probe_database(uri)
                try:
                    self._client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
                except Exception as exc:
                    raise RegistryUnavailable(
                        f"MLflow registry {_redact(registry or tracking)} cannot be opened: {_cause(exc)}"
                    ) from exc
            return self._client

    def resolve(self, uri: str) -> ModelRef:
        """The version a location holds now (an alias is looked up, a directory digested, a remote
        artifact URI listed on every call: see the module's docstring for what each costs)."""
        if match := _MODELS_URI.match(uri):
            return self._resolve_registered(uri, match)
        if match := _RUNS_URI.match(uri):
            return self._resolve_run(uri, match)
        path = local_path(uri)
        if path is not None:
            return self._resolve_directory(uri, path)
        if _SCHEME.match(uri):
            return self._resolve_remote(uri)
        raise ModelNotFound(f"cannot resolve model URI {uri!r}: it is not {_SERVED_FORMS}", uri=uri)

    def _resolve_registered(self, uri: str, match: re.Match[str]) -> ModelRef:
        from mlflow.exceptions import MlflowException

        client = self.mlflow_client()
        name, alias, version = match["name"], match["alias"], match["version"]
        try:
            if alias is not None:
                version = client.get_model_version_by_alias(name, alias).version
            else:
                version = client.get_model_version(name, version).version
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                message = f"MLflow has no model version for {uri!r}: {exc.message}"
                raise ModelNotFound(message, uri=uri) from exc
            raise RegistryUnavailable(f"MLflow registry did not answer for {uri!r}: {exc.message}") from exc
        except Exception as exc:  # driver errors of a sqlite/Postgres store, network errors
            raise RegistryUnavailable(f"MLflow registry failed for {uri!r}: {_cause(exc)}") from exc
        source = f"models:/{name}/{version}"
        return ModelRef(uri=uri, alias=alias, version=str(version), download_uri=source, source=source)

    def _resolve_run(self, uri: str, match: re.Match[str]) -> ModelRef:
        """A run's artifacts are written once, so its id names its content: the run must exist, and its
        files are downloaded at load."""
        from mlflow.exceptions import MlflowException

        client = self.mlflow_client()
        run, path = match["run"], match["path"].strip("/")
        try:
            client.get_run(run)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelNotFound(f"MLflow has no run for {uri!r}: {exc.message}", uri=uri) from exc
            raise RegistryUnavailable(f"MLflow tracking did not answer for {uri!r}: {exc.message}") from exc
        except Exception as exc:
            raise RegistryUnavailable(f"MLflow tracking failed for {uri!r}: {_cause(exc)}") from exc
        source = f"runs:/{run}/{path}"
        return ModelRef(uri=uri, alias=None, version=f"run-{run[:8]}", download_uri=source, source=source)

    def _resolve_directory(self, uri: str, path: Path) -> ModelRef:
        """A local model directory, loaded in place; its version is its ``content_digest``."""
        if not (path / "MLmodel").is_file():
            what = "holds no MLmodel file" if path.is_dir() else "does not exist"
            raise ModelNotFound(f"model directory {path} {what}", uri=uri)
        try:
            version, files = _digest(path, self._directories.get(path, {}))
        except OSError as exc:
            raise ModelLoadError(f"model directory {path} cannot be read: {exc}") from exc
        self._directories[path] = files
        return ModelRef(
            uri=uri, alias=None, version=version, download_uri=str(path), source=version, path=str(path)
        )

    def _resolve_remote(self, uri: str) -> ModelRef:
        """An artifact URI outside the registry: listed on every call; downloaded into a staging folder
        and digested when the listing (paths and sizes) differs from the last one, then kept under
        ``content/<digest>`` for ``load``."""
        listing = self._listing(uri)
        fingerprint = hashlib.sha256("".join(f"{p}\0{s}\n" for p, s in listing).encode()).hexdigest()
        known = self._remote.get(uri)
        if known is not None and known[0] == fingerprint:
            version = known[1]
            if (self._download_dir / _location(version) / "MLmodel").is_file():
                return ModelRef(uri=uri, alias=None, version=version, download_uri=uri, source=version)
        version = self._fetch_remote(uri)
        self._remote[uri] = (fingerprint, version)
        return ModelRef(uri=uri, alias=None, version=version, download_uri=uri, source=version)

    def _listing(self, uri: str) -> list[tuple[str, int]]:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        files: list[tuple[str, int]] = []
        try:
            repo = get_artifact_repository(uri)
            folders: list[str | None] = [None]
            while folders:
                for info in repo.list_artifacts(folders.pop()):
                    if info.is_dir:
                        folders.append(info.path)
                    else:
                        files.append((info.path, int(info.file_size or 0)))
        except ImportError as exc:
            raise RegistryUnavailable(
                f"the artifact store of {uri!r} needs a package Ferry's environment lacks: {exc}"
            ) from exc
        except Exception as exc:
            raise RegistryUnavailable(
                f"the artifact store did not answer for {uri!r}: {_cause(exc)}"
            ) from exc
        if not files:
            raise ModelNotFound(f"{uri} holds no files", uri=uri)
        return sorted(files)

    def _fetch_remote(self, uri: str) -> str:
        import mlflow

        self._download_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self._download_dir))
        try:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging)))
            except Exception as exc:
                raise RegistryUnavailable(f"download of {uri!r} failed: {_cause(exc)}") from exc
            if not (local / "MLmodel").is_file():
                raise ModelNotFound(f"{uri} holds no MLmodel file", uri=uri)
            version = content_digest(local)
            _settle(local, self._download_dir / _location(version))
            return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load(self, name: str, ref: ModelRef) -> LoadedModel:
        """Download (once per source) and load one version onto the configured device."""
        local = self._local_copy(name, ref)
        from mlflow.models import Model

        try:
            meta = Model.load(str(local))
            example = meta.load_input_example(str(local))
        except Exception as exc:
            raise ModelLoadError(f"model {name} v{ref.version}: unreadable MLmodel: {exc}") from exc
        loader = loading_flavor(meta.flavors)
        allowed = self._settings.allowed_flavors
        if loader not in allowed and "*" not in allowed:
            raise ModelLoadError(
                f"model {name} v{ref.version}: flavor {loader!r} is not allowed "
                f"(FERRY_ALLOWED_FLAVORS={','.join(allowed)}); add {loader} to FERRY_ALLOWED_FLAVORS to "
                "load it, knowing that loading it may run code from the model's artifact (README, Security)"
            )
        signature_inputs = _specs(meta.signature.inputs if meta.signature else None, "input")
        signature_outputs = _specs(meta.signature.outputs if meta.signature else None, "output")
        try:
            if "onnx" in meta.flavors:
                flavor, runtime, signature_inputs, signature_outputs = "onnx", *self._onnx(local, meta)
            elif "pytorch" in meta.flavors:
                with _LOADER:
                    flavor, runtime = "pytorch", self._torch(local, signature_inputs, signature_outputs)
            elif "python_function" in meta.flavors:
                with _LOADER:
                    flavor, runtime = "pyfunc", self._pyfunc(local, meta, signature_inputs, signature_outputs)
            else:
                raise ModelLoadError(f"model {name} v{ref.version} has no flavor Ferry can serve")
        except (ModelLoadError, ConfigurationError):
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {name} v{ref.version} failed to load: {exc}") from exc
        if not signature_inputs and flavor != "pyfunc":
            raise ModelLoadError(
                f"model {name} v{ref.version} has no signature: log it with a signature "
                "(mlflow.models.infer_signature) so Ferry can validate inputs"
            )
        if not signature_inputs:
            log.warning(
                "model %s v%s has no signature: requests reach it unchecked, and what it refuses is "
                "answered 422 (log it with mlflow.models.infer_signature to have Ferry check inputs)",
                name,
                ref.version,
            )
        return LoadedModel(
            name=name,
            ref=ref,
            flavor=flavor,
            runtime=runtime,
            inputs=signature_inputs,
            outputs=signature_outputs,
            input_example=_example(example, signature_inputs),
        )

    def device(self) -> str:
        from service.runtime.torch import cuda_device_count

        return resolve_device(self._settings.device, cuda_device_count())

    def local_copy(self, ref: ModelRef) -> Path:
        """Where ``ref``'s files are (or will be) on this machine: a local model's own directory, else
        ``download_dir`` / ``models/NAME/VERSION``, ``runs/RUN/PATH`` or ``content/<digest>``."""
        return Path(ref.path) if ref.path is not None else self._download_dir / _location(ref.source)

    def download(self, name: str, ref: ModelRef) -> Path:
        """``ref``'s files on this machine, downloaded first unless they are there already (the memory
        budget measures a model's size on disk before loading it)."""
        return self._local_copy(name, ref)

    def discard(self, ref: ModelRef) -> None:
        """Delete the downloaded copy of ``ref``'s files (a retired version's), so alias moves of a large
        model do not fill the disk. A local model's own directory is never touched."""
        if ref.path is None:
            shutil.rmtree(self.local_copy(ref), ignore_errors=True)

    def _local_copy(self, name: str, ref: ModelRef) -> Path:
        import mlflow

        target = self.local_copy(ref)
        if (target / "MLmodel").is_file():
            return target
        if ref.path is not None:
            raise ModelLoadError(f"model {name} v{ref.version}: {target} holds no MLmodel file any more")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            try:
                path = Path(
                    mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(partial))
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"model {name} v{ref.version}: download of {ref.download_uri} failed: {_cause(exc)}"
                ) from exc
            if not (path / "MLmodel").is_file():
                what = (
                    "holds no MLmodel file"
                    if any(path.iterdir())
                    else ("has no files: they are missing from the artifact store (deleted?)")
                )
                raise ModelLoadError(f"model {name} v{ref.version}: {ref.download_uri} {what}")
            if ref.source.startswith("sha-") and content_digest(path) != ref.source:
                raise ModelLoadError(
                    f"model {name} v{ref.version}: {ref.download_uri} changed since it was resolved; "
                    "the next poll resolves it again"
                )
            return _settle(path, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _onnx(self, local: Path, meta: Any) -> tuple[Runtime, list[TensorSpec], list[TensorSpec]]:
        from service.runtime.onnx import OnnxRuntime

        data = meta.flavors["onnx"].get("data", "model.onnx")
        runtime = OnnxRuntime(str(local / data), self.device(), self._settings.runtime.intra_op_threads)
        return runtime, runtime.input_specs(), runtime.output_specs()

    def _torch(self, local: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Runtime:
        import mlflow.pytorch

        from service.runtime.torch import TorchRuntime, set_cpu_threads

        set_cpu_threads(self._settings.runtime.intra_op_threads)
        module = mlflow.pytorch.load_model(str(local), map_location="cpu")
        return TorchRuntime(module, self.device(), [s.name for s in inputs], [s.name for s in outputs])

    def _pyfunc(self, local: Path, meta: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Runtime:
        import mlflow.pyfunc

        from service.runtime.pyfunc import PyfuncRuntime

        model = mlflow.pyfunc.load_model(str(local))
        out = outputs[0].name if outputs else "output"
        return PyfuncRuntime(model.predict, [s.name for s in inputs], out, table=is_table(inputs))


def loading_flavor(flavors: Mapping[str, Any]) -> str:
    """The MLflow flavor whose code loads a model, as Ferry loads it: ``onnx`` and ``pytorch`` natively,
    else the pyfunc loader module's flavor (``mlflow.sklearn`` is ``sklearn``; a custom ``PythonModel``,
    pickled or from code, is ``python_function``); ``""`` when it has none Ferry can load."""
    if "onnx" in flavors:
        return "onnx"
    if "pytorch" in flavors:
        return "pytorch"
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, Mapping):
        return ""
    loader = str(pyfunc.get("loader_module") or "")
    if loader == "mlflow.pyfunc" or loader.startswith("mlflow.pyfunc.") or not loader.startswith("mlflow."):
        return "python_function"  # mlflow.pyfunc.model (a PythonModel), .loaders.code_model (from code)
    return loader.removeprefix("mlflow.").split(".")[0]


def _location(source: str) -> Path:
    """The folder under ``download_dir`` that holds ``source``'s files: named by what they are, so two
    served names share one copy of a version and no two versions or models share one."""
    if match := re.match(r"^models:/([^/]+)/([^/]+)$", source):
        return Path("models", _safe(match[1]), _safe(match[2]))
    if match := _RUNS_URI.match(source):
        return Path("runs", _safe(match["run"]), *(_safe(p) for p in match["path"].split("/") if p))
    if source.startswith("sha-"):
        return Path("content", _safe(source.removeprefix("sha-")))
    return Path("other", hashlib.sha256(source.encode()).hexdigest()[:16])


def _safe(part: str) -> str:
    """A path component as a folder name: kept when harmless, else sanitized and made unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", part).lstrip(".")
    return safe if safe == part else f"{safe}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def _settle(download: Path, target: Path) -> Path:
    """Move a complete download to ``target`` in one rename; a complete copy already there (another
    load, another process) wins and the download is dropped by the caller."""
    if (target / "MLmodel").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover: a complete one has its MLmodel
    try:
        download.rename(target)
    except OSError:
        if not (target / "MLmodel").is_file():
            raise
    return target


def _probe_database(uri: str) -> None:
    """Connect once to an MLflow database store (PostgreSQL, MySQL, SQL Server) and raise
    ``RegistryUnavailable`` with the database's own reason when that fails (5 s connect timeout)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _SQL_STORES:
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    where = _redact(uri)
    try:
        args = {"connect_timeout": 5} if scheme in ("postgresql", "mysql") else {}
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=args)
    except ImportError as exc:
        extra = (
            "install Ferry's postgres extra: pip install 'ferry[postgres]'"
            if scheme == "postgresql"
            else ("install its SQLAlchemy driver")
        )
        raise RegistryUnavailable(
            f"MLflow registry {where} needs a database driver ({exc}): {extra}"
        ) from exc
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow registry URI {where} is not usable: {_cause(exc)}") from exc
    try:
        with engine.connect():
            pass
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow registry {where} refused the connection: {_cause(exc)}") from exc
    finally:
        engine.dispose()


def _redact(uri: str) -> str:
    """A store URI without its password."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


def _cause(exc: BaseException) -> str:
    """An exception as one line: the driver's own error for a SQLAlchemy one, MLflow's message, else
    ``Type: text``."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    message = getattr(exc, "message", None)
    text = message if isinstance(message, str) and message else f"{type(exc).__name__}: {exc}"
    line = " ".join(text.split())
    return line if len(line) <= 500 else line[:497] + "..."


def _specs(schema: Any, default_name: str) -> list[TensorSpec]:
    """An MLflow schema as Ferry specs: a tensor schema's tensors; a column schema's columns (one 1-D
    spec per column, ``service.columns``), or one 2-D input when its columns have no names."""
    if schema is None or len(schema.inputs) == 0:
        return []
    if schema.is_tensor_spec():
        specs = []
        for i, spec in enumerate(schema.inputs):
            name = spec.name or (default_name if len(schema.inputs) == 1 else f"{default_name}_{i}")
            specs.append(TensorSpec(name, np.dtype(spec.type), tuple(int(d) for d in spec.shape)))
        return specs
    if all(col.name for col in schema.inputs):
        return [column_spec(col.name, _column_type(col.type), col.required) for col in schema.inputs]
    if len(schema.inputs) == 1:
        return [column_spec(default_name, _column_type(schema.inputs[0].type))]
    dtypes = {np.dtype(col.type.to_numpy()) for col in schema.inputs}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float64)
    return [TensorSpec(default_name, dtype, (-1, len(schema.inputs)))]


def _column_type(kind: Any) -> str:
    """MLflow's name of a column type: ``double``, ``string``, ... (a ``DataType``), else ``array``,
    ``object``, ``map`` or ``any``."""
    name = getattr(kind, "name", None)
    if isinstance(name, str) and name in DTYPES:
        return name
    return type(kind).__name__.lower().removesuffix("type") or "any"


def _example(example: Any, inputs: list[TensorSpec]) -> dict[str, np.ndarray] | None:
    """The logged input example as arrays for the warm-up; ``None`` when there is none (or it does not
    fit the signature: the warm-up then uses zeros, or is skipped for a table)."""
    if example is None:
        return None
    if hasattr(example, "columns") and hasattr(example, "to_numpy"):  # a pandas DataFrame
        if not inputs or is_table(inputs):
            table = {str(c): example[c].to_numpy() for c in example.columns}
            try:
                arrays, _ = decode_inputs(inputs, table, unknown="ignore") if inputs else (table, 0)
            except InvalidInput as exc:
                log.warning("the input example does not match the signature (%s): not used", exc.message)
                return None
            return arrays
        example = example.to_numpy()
    if isinstance(example, Mapping):
        return {str(k): np.asarray(v) for k, v in example.items()}
    if not inputs:
        return {POSITIONAL: np.asarray(example)}
    return {inputs[0].name: np.asarray(example, dtype=inputs[0].dtype)}
