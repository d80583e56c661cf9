"""Every Prometheus metric Ferry exports: names, labels, buckets.

One ``Metrics`` object per app, on its own ``CollectorRegistry``, so that several apps (tests) can live
in one process. Labels are bounded: model name, version, stage, reason, tier; never a raw path or an
input value. Units are base units (seconds, bytes, ratios) as Prometheus naming asks.
"""

from __future__ import annotations

import bisect
import glob
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    Summary,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Seconds. The p99 objective (``monitoring/``) sits on the 0.1 s boundary."""
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))
"""Rows per model call: 1, 2, 4, ... 1024."""
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds to download, load and warm up one model version."""
OUTPUT_BUCKETS = (-10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Values of a regression model's first output (drift watching)."""
MAX_CLASS_LABELS = 32
"""Classifiers with more classes than this count their predictions in one ``other`` label."""

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Method labels kept as sent; any other method name a client makes up is counted as ``other``, so that
clients cannot create label values (and series) at will."""
STAGES = ("queue", "compute", "total")
REJECT_REASONS = ("overload", "timeout", "invalid_input", "client_gone")
HTTP_REJECT_REASONS = ("concurrency", "header_timeout", "header_size", "body_timeout")
"""Why the HTTP layer refused a request before any model saw it (``ferry_http_rejected_total``)."""
WEBHOOK_SERIES = (
    ("model_version_alias.created", "accepted"),
    ("model_version_alias.created", "ignored"),
    ("unknown", "bad_signature"),
    ("unknown", "stale"),
    ("unknown", "replayed"),
)
"""The ``ferry_webhooks_total`` series exported at 0 before any delivery."""
LOAD_REASONS = ("startup", "first_request", "reload", "admin", "repository", "sync")
UNLOAD_REASONS = ("evicted", "repository", "admin")
"""Why a model was loaded or unloaded (``ferry_model_loads_total``, ``ferry_model_unloads_total``)."""
SHADOW_DROP_REASONS = ("busy", "in_flight", "failed")
"""Why shadow work was dropped (``ferry_challenger_shadow_dropped_total``)."""
DIFFERENCE_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Absolute difference between challenger and champion outputs, per row (largest over its values)."""


GAUGE_MODES = {
    "http_requests_inprogress": "livesum",
    "ferry_queue_rows": "livesum",
    "ferry_queue_capacity_rows": "livesum",
    "ferry_model_ready": "livemin",
    "ferry_challenger_ready": "livemin",
    "ferry_model_info": "livemax",
    "ferry_memory_used_bytes": "livemax",
    "ferry_memory_budget_bytes": "livemax",
    "ferry_cache_breaker_state": "livemax",
    "ferry_cache_memory_bytes": "livesum",
    "ferry_cache_memory_entries": "livesum",
}
"""How each gauge reads across workers (``FERRY_WORKERS`` > 1): ``livesum`` adds the live workers' values
(rows queued, requests in progress, cache bytes), ``livemin`` is 1 only when every live worker has it
(ready), ``livemax`` the largest (the fullest worker's memory, the worst breaker, a version any worker
serves). A gauge missing here is exported per worker (``liveall``: a ``pid`` label)."""


def multiprocess_dir() -> str | None:
    """The folder every worker writes its metric values to, when a supervisor runs workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Gauge(prometheus_client.Gauge):
    """prometheus_client's gauge with its multiprocess mode from ``GAUGE_MODES``, and a ``remove`` that
    works across workers: prometheus_client cannot delete a series from a worker's file, so the series
    is written as NaN there first and ``MergedCollector`` leaves NaN gauge samples out."""

    def __init__(self, name: str, documentation: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiprocess_mode", GAUGE_MODES.get(name, "liveall"))
        super().__init__(name, documentation, *args, **kwargs)

    def remove(self, *labelvalues: Any) -> None:
        if multiprocess_dir() is None:
            super().remove(*labelvalues)
            return
        self.labels(*labelvalues).set(math.nan)
        with warnings.catch_warnings():  # "not implemented in multi-process mode": done above
            warnings.simplefilter("ignore", UserWarning)
            super().remove(*labelvalues)


class MergedCollector(MultiProcessCollector):
    """Every worker's values, merged: counters, histograms and summaries added up, gauges by their mode,
    series removed by a worker (NaN) left out."""

    def collect(self) -> Iterable[Metric]:
        files = glob.glob(os.path.join(self._path, "*.db"))
        metrics = self._read_metrics(files)  # type: ignore[no-untyped-call]
        for metric in metrics.values():
            if metric.type == "gauge":
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
        merged: Iterable[Metric] = self._accumulate_metrics(metrics, True)  # type: ignore[no-untyped-call]
        return merged


def fast_inc(child: Any) -> Callable[[float], None]:
    """A counter's or gauge's child incremented straight into its value (``child.inc`` checks, per call,
    that the child has labels, that the amount is not negative and whether an exemplar came: about 1 µs
    of the 1.5 µs; the request path only adds counts it knows are positive). The same value object, so
    worker processes' files too (``FERRY_WORKERS`` > 1)."""
    inc: Callable[[float], None] = child._value.inc
    return inc


def fast_set(child: Any) -> Callable[[float], None]:
    """A gauge's child set straight into its value (see ``fast_inc``; not for the ``mostrecent`` mode,
    which no Ferry gauge uses)."""
    value = child._value

    def set_(amount: float) -> None:
        value.set(float(amount))

    return set_


def fast_observe(child: Any) -> Callable[[float], None]:
    """A histogram's child observed straight into its values: the sum, and the one bucket whose upper
    bound is the first at or above the amount, found by bisection (``Histogram.observe`` checks the
    labels and an exemplar and walks the bounds one by one). A NaN, which no bound holds, counts in the
    sum only, as ``Histogram.observe`` counts it."""
    bounds = list(child._upper_bounds)
    buckets = [bucket.inc for bucket in child._buckets]
    add = child._sum.inc
    last = len(bounds) - 1

    def observe(amount: float) -> None:
        add(amount)
        i = bisect.bisect_left(bounds, amount)
        if i <= last and amount <= bounds[i]:
            buckets[i](1)

    return observe


def fast_summary(child: Any) -> Callable[[float], None]:
    """A summary's child observed straight into its count and sum (see ``fast_inc``)."""
    count, add = child._count.inc, child._sum.inc

    def observe(amount: float) -> None:
        count(1)
        add(amount)

    return observe


SWAP_SERIES = (
    ("load", "committed"),
    ("load", "rejected"),
    ("load", "unchanged"),
    ("add", "committed"),
    ("add", "rejected"),
    ("remove", "committed"),
    ("unload", "committed"),
)
"""``ferry_swap_rounds_total``'s series: remove and unload are applied, never rejected."""


class Metrics:
    """The metric objects of one Ferry app."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        self.build_info = Info("ferry_build", "Ferry's version.", registry=r)
        # HTTP layer: FastPath records the inference routes, prometheus-fastapi-instrumentator the rest,
        # both through ``observe_http`` into these objects.
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["handler", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration, from the first byte handled to the response sent.",
            ["handler", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_request_size = Summary(
            "http_request_size_bytes", "Request body bytes (Content-Length).", ["handler"], registry=r
        )
        self.http_response_size = Summary(
            "http_response_size_bytes", "Response body bytes.", ["handler"], registry=r
        )
        self._http_children: dict[tuple[str, str, str], tuple[Callable[[float], None], ...]] = {}
        self.http_inprogress = Gauge(
            "http_requests_inprogress",
            "Inference requests (the hot routes) being answered now; the autoscaling signal.",
            ["handler", "method"],
            registry=r,
        )
        self.inference_duration = Histogram(
            "ferry_inference_duration_seconds",
            "Time inside the service per request, by stage: queue (waiting for a batch), compute "
            "(the model call of its batch) and total (decode to encoded response).",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "ferry_inference_requests_total",
            "Inference requests answered from the model or the cache, by protocol.",
            ["model", "version", "protocol"],
            registry=r,
        )
        self.rows = Counter(
            "ferry_inference_rows_total",
            "Rows (batch-axis entries) answered, by protocol.",
            ["model", "version", "protocol"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "ferry_batch_rows",
            "Rows per model call; the count is the number of model calls.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge(
            "ferry_queue_rows",
            "Rows waiting for a model call.",
            ["model", "version"],
            registry=r,
        )
        self.queue_capacity_rows = Gauge(
            "ferry_queue_capacity_rows",
            "Most rows that may wait per model version (FERRY_BATCH__QUEUE_ROWS).",
            ["model", "version"],
            registry=r,
        )
        self.rejected = Counter(
            "ferry_requests_rejected_total",
            "Inference requests refused, by reason: overload (queue full), timeout (deadline passed), "
            "invalid_input (did not match the signature), client_gone (the client hung up while the "
            "request waited in the queue: the model never ran it).",
            ["model", "reason"],
            registry=r,
        )
        self.http_rejected = Counter(
            "ferry_http_rejected_total",
            "Requests refused at the HTTP layer, by reason: concurrency (more than "
            "FERRY_LIMITS__MAX_CONCURRENCY in flight: 503), header_timeout (headers incomplete after "
            "FERRY_LIMITS__HEADER_TIMEOUT_S: 408 and closed), header_size (headers above "
            "FERRY_LIMITS__MAX_HEADER_BYTES: 431), body_timeout (body incomplete after "
            "FERRY_LIMITS__BODY_TIMEOUT_S: 408).",
            ["reason"],
            registry=r,
        )
        for reason in HTTP_REJECT_REASONS:  # exported at 0 from the start, so rates see the first one
            self.http_rejected.labels(reason)
        self.grpc_requests = Counter(
            "ferry_grpc_requests_total",
            "gRPC calls answered (FERRY_GRPC_PORT), by method of inference.GRPCInferenceService and "
            "status code (OK, INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE...).",
            ["method", "code"],
            registry=r,
        )
        self.failures = Counter(
            "ferry_inference_failures_total",
            "Model calls that raised; every request of the batch got a 500.",
            ["model", "version"],
            registry=r,
        )
        self.load_duration = Histogram(
            "ferry_model_load_duration_seconds",
            "Time to resolve, download, load and warm up a model version.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "ferry_model_load_failures_total",
            "Model versions that failed to load or warm up, by stage (resolve, load, warmup).",
            ["model", "stage"],
            registry=r,
        )
        self.reloads = Counter(
            "ferry_model_reloads_total",
            "Versions alias following tried to swap in (retries of a failed one included), by result: "
            "swapped (serving now) or rejected (failed to load or warm up; the old version kept serving).",
            ["model", "result"],
            registry=r,
        )
        self.webhooks = Counter(
            "ferry_webhooks_total",
            "MLflow registry webhook deliveries (POST /webhooks/mlflow), by event "
            "(model_version_alias.created/deleted, other, unknown: not authenticated or not parsed) and "
            "outcome: accepted (a served model is checked now), ignored (no served model follows it), "
            "bad_signature, stale (timestamp out of the window), replayed (delivery id seen), invalid.",
            ["event", "outcome"],
            registry=r,
        )
        for event, outcome in WEBHOOK_SERIES:  # exported at 0 from the start
            self.webhooks.labels(event, outcome)
        self.worker_restarts = Counter(
            "ferry_worker_restarts_total",
            "Worker processes restarted by the supervisor after they died (FERRY_WORKERS > 1; 0 with one "
            "process).",
            registry=r,
        )
        self.swap_rounds = Counter(
            "ferry_swap_rounds_total",
            "Coordinated model changes across worker processes (FERRY_WORKERS > 1), by action (load, add, "
            "remove, unload) and result (committed, rejected, unchanged).",
            ["action", "result"],
            registry=r,
        )
        for action, result in SWAP_SERIES:  # exported at 0 from the start
            self.swap_rounds.labels(action, result)
        self.swap_commit = Histogram(
            "ferry_swap_commit_seconds",
            "From the supervisor's commit of a coordinated load to the last worker's answer that it swapped: "
            "the longest any worker may answer with the old version after another answers with the new.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.model_ready = Gauge(
            "ferry_model_ready",
            "1 when the model is loaded, warmed up and serving; 0 otherwise.",
            ["model"],
            registry=r,
        )
        self.model_loads = Counter(
            "ferry_model_loads_total",
            "Model versions loaded and serving, by why: startup, first_request (loaded on demand under "
            "the memory budget), reload (alias moved, or a failed load retried), admin, repository.",
            ["model", "reason"],
            registry=r,
        )
        self.model_unloads = Counter(
            "ferry_model_unloads_total",
            "Models unloaded while still served, by why: evicted (least recently used idle model, to "
            "make room in the memory budget), repository, admin.",
            ["model", "reason"],
            registry=r,
        )
        self.memory_used = Gauge(
            "ferry_memory_used_bytes",
            "Bytes of the loaded and loading models against FERRY_MEMORY__BUDGET_BYTES, each measured "
            "as its files on disk (0 without a budget: sizes are measured only under one).",
            registry=r,
        )
        self.memory_budget = Gauge(
            "ferry_memory_budget_bytes",
            "FERRY_MEMORY__BUDGET_BYTES: bytes the loaded models may take (0: no budget).",
            registry=r,
        )
        # Challenger traffic (service/challenger.py): FERRY_CHALLENGER__MODE shadow or canary.
        self.challenger_ready = Gauge(
            "ferry_challenger_ready",
            "1 while a challenger version (FERRY_CHALLENGER__ALIAS) is loaded beside the model; 0 otherwise.",
            ["model"],
            registry=r,
        )
        self.challenger_compared = Counter(
            "ferry_challenger_compared_rows_total",
            "Shadowed rows whose challenger output was compared with the champion's answer.",
            ["model"],
            registry=r,
        )
        self.challenger_agreed = Counter(
            "ferry_challenger_agreed_rows_total",
            "Compared rows on which the challenger agreed: the same argmax for a classifier, every value "
            "within FERRY_CHALLENGER__TOLERANCE otherwise, equal values for strings.",
            ["model"],
            registry=r,
        )
        self.challenger_difference = Histogram(
            "ferry_challenger_difference",
            "Absolute difference between challenger and champion per compared numeric row (its largest).",
            ["model"],
            buckets=DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.challenger_dropped = Counter(
            "ferry_challenger_shadow_dropped_total",
            "Sampled shadow work not compared, by reason: busy (the challenger's queue held a full batch), "
            "in_flight (FERRY_CHALLENGER__SHADOW_IN_FLIGHT shadow calls running), failed (the challenger "
            "raised, refused the input, timed out or answered another shape).",
            ["model", "reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "ferry_model_info",
            "Always 1; labels describe the loaded model version.",
            ["model", "version", "alias", "flavor", "runtime", "device", "provider"],
            registry=r,
        )
        self.predicted_class = Counter(
            "ferry_predicted_class_total",
            "Predicted class (argmax of the first output) of classifier rows, for drift watching.",
            ["model", "version", "class"],
            registry=r,
        )
        self.output_value = Histogram(
            "ferry_output_value",
            "First output value of non-classifier rows, for drift watching.",
            ["model", "version"],
            buckets=OUTPUT_BUCKETS,
            registry=r,
        )
        # Cache (service/cache/, the response tier in service/api/replay.py).
        self.cache_lookups = Counter(
            "ferry_cache_lookups_total",
            "Prediction cache lookups by tier (response, memory, redis) and result (hit, miss).",
            ["model", "tier", "result"],
            registry=r,
        )
        self.cache_errors = Counter(
            "ferry_cache_errors_total",
            "Cache operations that failed open (timeout, connection error, corrupt value), by tier and "
            "operation (get, set).",
            ["tier", "operation"],
            registry=r,
        )
        self.cache_unauthenticated = Counter(
            "ferry_cache_unauthenticated_total",
            "Redis values refused because their MAC did not verify under FERRY_CACHE__REDIS_SECRET: "
            "forged, written under another secret or without one. Each is a miss.",
            registry=r,
        )
        self.cache_redis_duration = Histogram(
            "ferry_cache_redis_duration_seconds",
            "Duration of one Redis call, by operation (get, set).",
            ["operation"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.cache_breaker_state = Gauge(
            "ferry_cache_breaker_state",
            "Redis circuit breaker: 0 closed (calling Redis), 1 half-open (probing), 2 open (skipping).",
            registry=r,
        )
        self.cache_memory_bytes = Gauge(
            "ferry_cache_memory_bytes",
            "Bytes held by the in-process cache tier (keys and values).",
            registry=r,
        )
        self.cache_memory_entries = Gauge(
            "ferry_cache_memory_entries",
            "Entries held by the in-process cache tier.",
            registry=r,
        )
        self.cache_coalesced = Counter(
            "ferry_cache_coalesced_total",
            "Requests that waited for an identical request in flight instead of running the model.",
            ["model"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The ``/metrics`` text. With workers: the values of all of them (``MergedCollector``), plus what
        only this process collects once (build info, the GPU collector, ``process_*`` of the worker that
        answers the scrape)."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = list(MergedCollector(CollectorRegistry(), path).collect())  # type: ignore[no-untyped-call]
        names = {m.name for m in merged}
        local = [m for m in self.registry.collect() if m.name not in names]
        view = CollectorRegistry(auto_describe=False)
        view.register(_Families([*merged, *local]))
        return generate_latest(view)

    def model_served(self, name: str) -> None:
        """Export ``name``'s load and unload counters at 0 for every reason, so rates see the first one."""
        for reason in LOAD_REASONS:
            self.model_loads.labels(name, reason)
        for reason in UNLOAD_REASONS:
            self.model_unloads.labels(name, reason)

    def challenger_served(self, name: str) -> None:
        """Export ``name``'s challenger series at 0, so rates and ratios see the first shadowed row."""
        self.challenger_ready.labels(name).set(0)
        self.challenger_compared.labels(name)
        self.challenger_agreed.labels(name)
        for reason in SHADOW_DROP_REASONS:
            self.challenger_dropped.labels(name, reason)

    def observe_http(
        self, handler: str, method: str, status: int, seconds: float, request_bytes: int, response_bytes: int
    ) -> None:
        """Record one HTTP request (label children cached: this runs for every request)."""
        if method not in HTTP_METHODS:
            method = "other"
        key = (handler, method, str(status))
        children = self._http_children.get(key)
        if children is None:
            children = self._http_children[key] = (
                fast_inc(self.http_requests.labels(handler, method, key[2])),
                fast_observe(self.http_duration.labels(handler, method)),
                fast_summary(self.http_request_size.labels(handler)),
                fast_summary(self.http_response_size.labels(handler)),
            )
        children[0](1)
        children[1](seconds)
        children[2](request_bytes)
        children[3](response_bytes)


class _Families:
    """A collector of families collected already (one scrape's merged view)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class ModelMetrics:
    """The metric children of one model version, looked up once (label lookups are not free); the
    batcher reports to it as its ``BatchObserver``."""

    def __init__(self, metrics: Metrics, name: str, version: str, classes: int) -> None:
        duration = metrics.inference_duration
        self.queue_s = duration.labels(name, version, "queue")
        self.compute_s = duration.labels(name, version, "compute")
        self.total_s = duration.labels(name, version, "total")
        self.batch_rows = metrics.batch_rows.labels(name, version)
        self.queue_rows = metrics.queue_rows.labels(name, version)
        self.invalid = metrics.rejected.labels(name, "invalid_input")
        self.overload = metrics.rejected.labels(name, "overload")
        self.timeout = metrics.rejected.labels(name, "timeout")
        self.client_gone = metrics.rejected.labels(name, "client_gone")
        self.failures = metrics.failures.labels(name, version)
        self._metrics, self._name, self._version = metrics, name, version
        self.classes = [
            metrics.predicted_class.labels(name, version, str(i))
            for i in range(min(classes, MAX_CLASS_LABELS))
        ]
        self.other_class = (
            metrics.predicted_class.labels(name, version, "other") if classes > MAX_CLASS_LABELS else None
        )
        self.output_value = metrics.output_value.labels(name, version)
        self._protocols: dict[str, tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._replay_hit: Any = None
        # What every request or model call records, straight into the children's values (``fast_inc``).
        self.observe_queue = fast_observe(self.queue_s)
        self.observe_compute = fast_observe(self.compute_s)
        self.observe_total = fast_observe(self.total_s)
        self._batch_rows = fast_observe(self.batch_rows)
        self._queue_rows = fast_set(self.queue_rows)
        self._classes = [fast_inc(child) for child in self.classes]
        self._other_class = fast_inc(self.other_class) if self.other_class is not None else None
        self._output_value = fast_observe(self.output_value)

    def replayed(self, protocol: str, rows: int) -> None:
        """A repeat answered from the response tier of the cache."""
        if self._replay_hit is None:
            self._replay_hit = self._metrics.cache_lookups.labels(self._name, "response", "hit")
        self._replay_hit.inc()
        self.answered(protocol, rows)

    def answered(self, protocol: str, rows: int) -> None:
        pair = self._protocols.get(protocol)
        if pair is None:
            m = self._metrics
            pair = (
                fast_inc(m.requests.labels(self._name, self._version, protocol)),
                fast_inc(m.rows.labels(self._name, self._version, protocol)),
            )
            self._protocols[protocol] = pair
        pair[0](1)
        pair[1](rows)

    # BatchObserver
    def batch(self, rows: int, compute_s: float) -> None:
        self._batch_rows(rows)

    def queue(self, rows: int) -> None:
        self._queue_rows(rows)

    def failed(self, requests: int) -> None:
        self.failures.inc()

    def abandoned(self, requests: int) -> None:
        self.client_gone.inc(requests)

    def outputs(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Drift summary of a batch (runs in the worker thread, off the event loop)."""
        first = next(iter(outputs.values()), None)
        if first is None or first.ndim == 0 or first.dtype.kind != "f":
            return
        if self.classes and first.ndim == 2:
            if first.shape[0] == 1:  # a lone request's row: its class, without counting every class
                self._predicted(int(first[0].argmax()), 1)
                return
            counts = np.bincount(first.argmax(axis=1), minlength=first.shape[1])
            for index, count in enumerate(counts.tolist()):
                if count:
                    self._predicted(index, count)
        else:
            observe = self._output_value
            for value in first.reshape(first.shape[0], -1)[:64, 0].tolist():
                observe(value)

    def _predicted(self, index: int, count: int) -> None:
        inc = self._classes[index] if index < len(self._classes) else self._other_class
        if inc is not None:
            inc(count)
