"""Ferry's settings tree.

Every setting comes from the environment (prefix ``FERRY_``, nested sections joined with ``__``, for
example ``FERRY_BATCH__MAX_ROWS=128``) or from the CLI flags that mirror the main ones. Every field
has a safe default and a one-line docstring with its unit; the README's configuration table lists
them. Settings are built in ``main``/``create_app``, never at import time.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_TRACKING_URI = "sqlite:///.ferry/mlflow.db"
"""The embedded registry: a sqlite file under ``.ferry/`` in the working directory."""

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class BatchSettings(BaseModel):
    """Dynamic batching, per model version."""

    enabled: bool = True
    """Coalesce concurrent requests into one model call; off runs every request alone."""
    max_rows: Annotated[int, Field(gt=0)] = 64
    """Most rows in one model call (rows, not requests)."""
    max_wait_ms: Annotated[float, Field(ge=0)] = 0.0
    """Extra time a batch waits for more rows after the first arrives (milliseconds); 0 never waits
    when the model is idle and gathers what queued while it was busy."""
    queue_rows: Annotated[int, Field(gt=0)] = 4096
    """Most rows waiting per model; beyond it requests get 503 with Retry-After (rows)."""
    timeout_ms: Annotated[float, Field(gt=0)] = 30_000.0
    """Deadline of one request inside the service, queue wait and compute (milliseconds); 504 after it."""
    inline_max_us: Annotated[float, Field(ge=0)] = 200.0
    """A request that finds its ONNX or PyTorch model idle (nothing queued or computing, no other request
    arriving with it) runs on the event loop, without the worker thread's two hops, when the model's
    measured compute time is below this (microseconds); 0 never. Not for pyfunc models (their code may
    wait), nor when ``max_wait_ms`` is set (batches wait for more rows)."""


class RuntimeSettings(BaseModel):
    """Framework threading. One process per device; the HTTP loop needs a core of its own."""

    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    """Threads inside one ONNX Runtime / torch CPU operator (0: the framework's default, all cores)."""


class ModelCacheSettings(BaseModel):
    """Per-model overrides of the cache settings."""

    enabled: bool | None = None
    """Cache this model's predictions (unset: the global ``cache.enabled``)."""
    ttl_s: Annotated[float, Field(gt=0)] | None = None
    """Lifetime of this model's entries (seconds; unset: the global ``cache.ttl_s``)."""


class CacheSettings(BaseModel):
    """Prediction cache: an in-process LRU, and Redis behind it when ``FERRY_REDIS_URL`` is set."""

    enabled: bool = True
    """Cache predictions at all."""
    memory_bytes: Annotated[int, Field(ge=0)] = 64 * 1024 * 1024
    """Size bound of the in-process tier (bytes; 0 turns the tier off)."""
    response_bytes: Annotated[int, Field(ge=0)] = 16 * 1024 * 1024
    """Size bound of the in-process tier of whole rendered answers keyed on the raw request, which
    answers an exact repeat before its body is parsed (bytes; 0 turns it off)."""
    ttl_s: Annotated[float, Field(gt=0)] = 300.0
    """Lifetime of an entry in either tier (seconds)."""
    redis_timeout_ms: Annotated[float, Field(gt=0)] = 50.0
    """Bound on one Redis call before it counts as failed and the request goes on without it (ms)."""
    breaker_failures: Annotated[int, Field(gt=0)] = 5
    """Consecutive Redis failures that open the circuit breaker."""
    breaker_reset_s: Annotated[float, Field(gt=0)] = 5.0
    """Time the breaker stays open before one probe call (seconds)."""
    key_prefix: str = "ferry:v1:"
    """Prefix of every Redis key (lets several deployments share one Redis)."""
    redis_secret: SecretStr | None = None
    """Key of the MAC (HMAC-SHA256) every value written to Redis carries and every value read must
    verify under (at least 16 characters, the same on every replica); unset: values are not
    authenticated and start-up warns."""
    redis_secret_file: str | None = None
    """A file holding ``redis_secret`` (a mounted Kubernetes Secret; one trailing newline is dropped)."""
    models: dict[str, ModelCacheSettings] = Field(default_factory=dict)
    """Per-model overrides, JSON: ``{"image-cnn": {"ttl_s": 60}, "fraud": {"enabled": false}}``."""

    @model_validator(mode="after")
    def _one_secret(self) -> CacheSettings:
        if self.redis_secret is not None and self.redis_secret_file is not None:
            raise ValueError("set redis_secret or redis_secret_file, not both")
        if self.redis_secret is not None and len(self.redis_secret.get_secret_value()) < 16:
            raise ValueError("redis_secret must be at least 16 characters (e.g. openssl rand -hex 32)")
        return self


class LimitSettings(BaseModel):
    """Bounds on what one request, one connection and all requests together may ask for."""

    max_body_bytes: Annotated[int, Field(gt=0)] = 32 * 1024 * 1024
    """Largest request body (bytes); larger ones get 413 before their body is read."""
    max_rows: Annotated[int, Field(gt=0)] = 65_536
    """Most rows in one request; more get 413."""
    max_concurrency: Annotated[int, Field(ge=0)] = 256
    """Most requests in flight at once, probes and ``/metrics`` not counted; beyond it 503 with
    Retry-After before the body is read (0: no cap). Bodies in memory are at most this times
    ``max_body_bytes``."""
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """Time to send a request's line and headers, from the connection's opening or the request's first
    byte (seconds); then the connection is closed, with a 408 when part of a request arrived."""
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Time for a request's whole body to arrive, from the first read after its headers (seconds); then
    408 and the connection is closed."""
    max_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    """Largest request line plus headers (bytes); a larger one gets 431 and the connection is closed."""
    keep_alive_s: Annotated[float, Field(gt=0)] = 5.0
    """Time an idle keep-alive connection stays open between requests (seconds); keep it above the idle
    timeout of a load balancer in front."""


class ReloadSettings(BaseModel):
    """Following aliases: a moved alias is loaded, warmed up and swapped in without downtime."""

    poll_s: Annotated[float, Field(ge=0)] = 30.0
    """Seconds between alias look-ups in the registry (0 turns following off)."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 300.0
    """Longest wait before retrying a version that failed to load or warm up (seconds; doubles from
    ``poll_s`` on each failure)."""
    webhook_secret: SecretStr | None = None
    """Secret of the MLflow registry webhook whose deliveries (``POST /webhooks/mlflow``, HMAC-signed)
    make Ferry check a moved alias at once (at least 16 characters); unset: the route is off (404)."""
    webhook_secret_file: str | None = None
    """A file holding ``webhook_secret`` (a mounted Kubernetes Secret; one trailing newline is dropped)."""
    webhook_max_age_s: Annotated[float, Field(gt=0)] = 300.0
    """Replay window: a delivery whose ``X-MLflow-Timestamp`` is further than this from Ferry's clock is
    refused (seconds)."""

    @property
    def webhooks(self) -> bool:
        """Whether push reloads are on (a secret is set; ``service/webhooks.py`` reads and checks it at
        start-up, never quoting it: a settings error would print the input)."""
        return self.webhook_secret is not None or self.webhook_secret_file is not None


class MemorySettings(BaseModel):
    """More models than memory: a budget per device (one Ferry process serves one device)."""

    budget_bytes: Annotated[int, Field(gt=0)] | None = None
    """Bytes the loaded models may take, measured as their files on disk (unset: no budget, every model
    loads at start-up); models beyond it load on their first request, evicting the least recently used
    idle one."""


class ChallengerSettings(BaseModel):
    """Challenger traffic: a second alias of each ``models:/NAME@ALIAS`` model served beside it."""

    mode: Literal["off", "shadow", "canary"] = "off"
    """``off``; ``shadow``: a sampled share of requests also runs on the challenger after the champion
    answered, compared, never seen by the client; ``canary``: a share of requests is answered by it."""
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "challenger"
    """The registry alias of the challenger version (looked up at load and at every reload poll)."""
    share: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Share of requests shadowed (sampled at random) or answered by the challenger (canary: sticky
    by the key header's hash, random without it); 0 to 1."""
    key_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")] = "X-Request-Key"
    """Request header (gRPC: metadata key) whose value keeps a client on one side of a canary: the same
    key always gets the same version."""
    shadow_in_flight: Annotated[int, Field(gt=0)] = 8
    """Most shadow calls running at once per process; more are dropped (and counted), never queued."""
    tolerance: Annotated[float, Field(ge=0)] = 1e-4
    """Largest absolute difference at which a regression row (non-classifier output) still agrees."""


class ShutdownSettings(BaseModel):
    """Graceful shutdown on SIGTERM."""

    grace_s: Annotated[float, Field(ge=0)] = 5.0
    """After SIGTERM: seconds to keep serving with readiness 503, so load balancers stop sending."""


SAFE_FLAVORS = ("onnx", "pytorch")
"""Flavors whose loading runs no code from the model's artifact: an ONNX graph, and a PyTorch program
saved by ``torch.export`` (a pickled PyTorch model is refused by MLflow's pickle switch, off here)."""


class Settings(BaseSettings):
    """All of Ferry's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="FERRY_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Models to serve: comma-separated ``name=URI`` or ``URI`` (``models:/n@alias``, ``models:/n/3``,
    ``runs:/id/path``, an MLflow model directory as an absolute path or ``file://`` URI, or any artifact
    URI MLflow downloads: ``s3://``, ``gs://``, ``https://``, ``mlflow-artifacts:/``)."""
    default_model: str | None = None
    """Model answering requests that name none (default: the first of ``models``)."""
    tracking_uri: str = Field(
        default=DEFAULT_TRACKING_URI,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "FERRY_TRACKING_URI"),
    )
    """MLflow tracking/registry URI (MLflow's own ``MLFLOW_TRACKING_URI``): sqlite, Postgres or a server."""
    registry_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_REGISTRY_URI", "FERRY_REGISTRY_URI"),
    )
    """MLflow registry URI when it differs from the tracking URI (``MLFLOW_REGISTRY_URI``)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    workers: int | Literal["auto"] = 1
    """Serving processes on the one port, each with its own copy of the models (``auto``: one per usable
    CPU core on CPU, one per GPU on CUDA); above 1 a supervisor starts, restarts and drains them."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """TCP port to listen on (0: any free port)."""
    metrics_port: Annotated[int, Field(gt=0, le=65535)] | None = None
    """Serve ``/metrics`` and ``/health/*`` on this port instead of ``port`` (unset: on ``port``)."""
    grpc_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Also serve the Open Inference Protocol over gRPC on this port, on ``host`` (0: any free port;
    unset: no gRPC)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` (one object per line) for log pipelines."""
    download_dir: str = ".ferry/models"
    """Local folder where model artifacts are downloaded (cached by model name and version)."""
    model_repository: str | None = None
    """A folder of MLflow model directories, one per model name (``/mnt/models/fraud``), as KServe's
    model agent lays them out: the repository extension's load of a name Ferry does not serve, without
    a URI, serves that folder's entry (unset: such a load is 404)."""
    warmup: bool = True
    """Run each model's logged input example through it before reporting ready."""
    allowed_flavors: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(SAFE_FLAVORS))
    """Comma-separated MLflow flavors Ferry may load (``*``: any). The flavor is the one that loads the
    model: ``onnx``, ``pytorch``, or a pyfunc model's loader (``sklearn``, ``xgboost``, ``lightgbm``,
    ``python_function`` for a custom ``PythonModel``...). Default ``onnx,pytorch``: loading these runs no
    code from the artifact; any other flavor may (README, Security)."""
    redis_url: SecretStr | None = None
    """Redis for the shared cache tier (``redis://``, ``rediss://``, ``unix://``); unset: memory only."""
    batch: BatchSettings = Field(default_factory=BatchSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    reload: ReloadSettings = Field(default_factory=ReloadSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    challenger: ChallengerSettings = Field(default_factory=ChallengerSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    admin_token: SecretStr | None = None
    """Bearer token of the admin API; unset turns the admin API off."""
    api_keys: SecretStr | None = None
    """Comma-separated API keys for the inference routes (``Authorization: Bearer`` or ``X-API-Key``);
    unset: inference is open. Kept only as SHA-256 digests in memory."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated origins allowed by CORS (``*`` for any); empty: CORS off."""
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @field_validator("models", "cors_origins", "allowed_flavors", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: object) -> object:
        text = str(value).strip().lower()
        if text == "auto":
            return text
        if not text.isdigit() or int(text) < 1:
            raise ValueError("workers must be an integer >= 1 or auto")
        return int(text)

    @model_validator(mode="after")
    def _workers_share_a_grpc_port(self) -> Settings:
        if self.workers != 1 and self.grpc_port == 0:
            raise ValueError(
                "grpc_port 0 cannot be combined with workers (other than 1): each worker would listen on a "
                "port of its own; give FERRY_GRPC_PORT a number, which every worker shares"
            )
        return self


def describe_invalid(exc: ValidationError) -> str:
    """Settings errors as ``FERRY_NAME: message`` lines, without the values given: pydantic's own text
    repeats each input, and an input may be a secret (``FERRY_API_KEYS``, a section holding
    ``redis_secret``)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        path = "__".join(str(part) for part in error["loc"])
        name = f"FERRY_{path.upper()}" if path else "settings"
        lines.append(f"  {name}: {error['msg']}")
    return "\n".join(lines)
