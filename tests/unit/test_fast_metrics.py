"""The request path's metric updates (``fast_inc``, ``fast_set``, ``fast_observe``, ``fast_summary``)
write what prometheus_client's own methods write: the same samples, bucket by bucket."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from service.metrics import (
    LATENCY_BUCKETS,
    OUTPUT_BUCKETS,
    Metrics,
    ModelMetrics,
    fast_inc,
    fast_observe,
    fast_set,
    fast_summary,
)

AMOUNTS = [
    0.0, 0.0001, 0.0005, 0.00050001, 0.001, 0.3, 30.0, 31.0, 1e9, -1.0, math.inf, -math.inf, math.nan,
]  # fmt: skip


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def same(a: dict[object, float], b: dict[object, float]) -> bool:
    return a.keys() == b.keys() and all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, OUTPUT_BUCKETS, (1.0, 2.0)])
def test_fast_observe_fills_the_buckets_histogram_observe_fills(buckets: tuple[float, ...]) -> None:
    slow, fast = CollectorRegistry(), CollectorRegistry()
    h_slow = Histogram("h", "h", ["m"], buckets=buckets, registry=slow).labels("x")
    observe = fast_observe(Histogram("h", "h", ["m"], buckets=buckets, registry=fast).labels("x"))
    for amount in AMOUNTS:
        h_slow.observe(amount)
        observe(amount)
        assert same(samples(slow), samples(fast)), amount


def test_fast_inc_set_and_summary_write_what_the_methods_write() -> None:
    slow, fast = CollectorRegistry(), CollectorRegistry()
    counter = Counter("c", "c", ["m"], registry=slow).labels("x")
    gauge = Gauge("g", "g", ["m"], registry=slow).labels("x")
    summary = Summary("s", "s", ["m"], registry=slow).labels("x")
    inc = fast_inc(Counter("c", "c", ["m"], registry=fast).labels("x"))
    fast_gauge = Gauge("g", "g", ["m"], registry=fast).labels("x")
    add, set_ = fast_inc(fast_gauge), fast_set(fast_gauge)
    observe = fast_summary(Summary("s", "s", ["m"], registry=fast).labels("x"))
    for amount in (1, 3, 0.5):
        counter.inc(amount)
        inc(amount)
        gauge.inc(amount)
        add(amount)
        summary.observe(amount)
        observe(amount)
    gauge.dec(2)
    add(-2)
    assert same(samples(slow), samples(fast))
    gauge.set(7)
    set_(7)
    assert same(samples(slow), samples(fast))


@pytest.mark.parametrize("rows", [1, 3])
def test_a_classifiers_rows_count_under_their_class(rows: int) -> None:
    metrics = Metrics(process=False)
    model = ModelMetrics(metrics, "m", "1", classes=4)
    logits = np.zeros((rows, 4), dtype=np.float32)
    logits[:, 2] = 1.0
    model.outputs({"logits": logits})
    value = metrics.registry.get_sample_value
    assert value("ferry_predicted_class_total", {"model": "m", "version": "1", "class": "2"}) == rows
    assert value("ferry_predicted_class_total", {"model": "m", "version": "1", "class": "0"}) == 0


def test_a_model_calls_and_answers_are_counted() -> None:
    metrics = Metrics(process=False)
    model = ModelMetrics(metrics, "m", "1", classes=0)
    model.observe_queue(0.0)
    model.observe_compute(0.0003)
    model.observe_total(0.002)
    model.batch(2, 0.0003)
    model.queue(5)
    model.answered("ferry", 2)
    model.outputs({"y": np.array([[0.7], [math.nan]])})
    value = metrics.registry.get_sample_value
    stage = {"model": "m", "version": "1"}
    assert value("ferry_inference_duration_seconds_count", {**stage, "stage": "queue"}) == 1
    assert value("ferry_inference_duration_seconds_bucket", {**stage, "stage": "queue", "le": "0.0005"}) == 1
    assert value("ferry_inference_duration_seconds_bucket", {**stage, "stage": "total", "le": "0.001"}) == 0
    assert value("ferry_inference_duration_seconds_bucket", {**stage, "stage": "total", "le": "0.0025"}) == 1
    assert value("ferry_batch_rows_bucket", {**stage, "le": "2.0"}) == 1
    assert value("ferry_queue_rows", stage) == 5
    assert value("ferry_inference_requests_total", {**stage, "protocol": "ferry"}) == 1
    assert value("ferry_inference_rows_total", {**stage, "protocol": "ferry"}) == 2
    assert value("ferry_output_value_bucket", {**stage, "le": "1.0"}) == 1  # the NaN is in no bucket
    assert value("ferry_output_value_count", stage) == 1
