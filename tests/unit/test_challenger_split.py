"""The challenger's pure parts: the sticky canary split, where a challenger comes from, the comparison of
its outputs with the champion's, and the shadow's bounds."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid

import numpy as np
import pytest
from prometheus_client import generate_latest

from conftest import metric
from service.challenger import Shadow, challenger_uri, compare, key_point, to_challenger
from service.config import ChallengerSettings, Settings
from service.metrics import Metrics


def test_the_same_key_always_gets_the_same_side() -> None:
    keys = [f"user-{i}" for i in range(500)]
    first = [to_challenger(k, 0.5) for k in keys]
    assert first == [to_challenger(k, 0.5) for k in keys]
    # No randomness involved when a key is sent: a draw that would say otherwise is never made.
    assert first == [to_challenger(k, 0.5, draw=lambda: 0.0) for k in keys]
    assert first == [to_challenger(k, 0.5, draw=lambda: 0.999) for k in keys]


def test_the_point_is_fixed_across_processes() -> None:
    # BLAKE2b, not Python's salted hash(): the same point on every replica and every run.
    digest = hashlib.blake2b(b"alice", digest_size=8, person=b"ferry-canary").digest()
    assert key_point("alice") == int.from_bytes(digest, "big") / 2**64
    assert 0 <= key_point("alice") < 1


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_the_share_of_keys_matches(share: float) -> None:
    keys = [str(uuid.UUID(int=random.Random(7).getrandbits(128) + i)) for i in range(20_000)]
    taken = sum(to_challenger(k, share) for k in keys) / len(keys)
    assert abs(taken - share) < 0.02


def test_share_zero_never_and_one_always() -> None:
    keys = [f"k{i}" for i in range(2000)] + [None] * 200
    assert not any(to_challenger(k, 0.0) for k in keys)
    assert all(to_challenger(k, 1.0) for k in keys)


def test_raising_the_share_only_moves_keys_to_the_challenger() -> None:
    keys = [f"k{i}" for i in range(5000)]
    at_10 = {k for k in keys if to_challenger(k, 0.1)}
    at_30 = {k for k in keys if to_challenger(k, 0.3)}
    assert at_10 < at_30


def test_without_a_key_the_draw_decides() -> None:
    assert to_challenger(None, 0.5, draw=lambda: 0.49)
    assert not to_challenger(None, 0.5, draw=lambda: 0.5)
    assert not to_challenger("", 0.5, draw=lambda: 0.7)  # an empty header is no key


def test_challenger_uri() -> None:
    assert challenger_uri("models:/fraud@champion", "challenger") == "models:/fraud@challenger"
    assert challenger_uri("models:/fraud@challenger", "challenger") is None
    assert challenger_uri("models:/fraud/3", "challenger") is None
    assert challenger_uri("runs:/abc/model", "challenger") is None
    assert challenger_uri("/mnt/models/fraud", "challenger") is None


def test_compare_classifier_by_argmax() -> None:
    champion = {"p": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)}
    challenger = {"q": np.array([[0.7, 0.3], [0.9, 0.1], [0.51, 0.49]], dtype=np.float32)}
    result = compare(champion, challenger, 1e-4)
    assert (result.rows, result.agreed) == (3, 2)
    assert result.differences is not None
    assert result.differences.tolist() == pytest.approx([0.2, 0.7, 0.09], abs=1e-6)


def test_compare_regression_within_tolerance() -> None:
    champion = {"y": np.array([[1.0], [2.0], [np.nan]])}
    challenger = {"y": np.array([[1.00001], [2.5], [np.nan]])}
    result = compare(champion, challenger, 1e-3)
    assert (result.rows, result.agreed) == (3, 2)  # NaN on both sides agrees
    one_nan = compare({"y": np.array([1.0])}, {"y": np.array([np.nan])}, 1e-3)
    assert one_nan.agreed == 0 and one_nan.differences is not None and np.isinf(one_nan.differences[0])


def test_compare_strings() -> None:
    result = compare({"l": np.array(["a", "b"], dtype=object)}, {"l": np.array(["a", "c"], dtype=object)}, 0)
    assert (result.rows, result.agreed, result.differences) == (2, 1, None)


@pytest.mark.parametrize(
    "challenger",
    [{"y": np.zeros((2, 4))}, {"y": np.array(["a", "b"], dtype=object)}, {}],
)
def test_compare_refuses_what_cannot_be_compared(challenger: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError):
        compare({"y": np.zeros((2, 3))}, challenger, 0)


class _Batcher:
    """Stands in for a challenger's batcher: its queue and whether it is closing are all the shadow reads
    before it starts; ``submit`` waits for ``release``."""

    def __init__(self, queued: int = 0) -> None:
        self.queued_rows, self.closing = queued, False
        self.release = asyncio.Event()
        self.calls = 0

    async def submit(self, arrays, rows, timeout_s, params, gone):  # type: ignore[no-untyped-def]
        self.calls += 1
        await self.release.wait()
        return type("Result", (), {"outputs": {"y": arrays["x"] * 2}})()


class _Version:
    def __init__(self, batcher: _Batcher) -> None:
        self.batcher, self.version = batcher, "2"
        self.model = type("Model", (), {"name": "m"})()


class _Call:
    def decode(self, model):  # type: ignore[no-untyped-def]
        from service.pipeline import Decoded

        return Decoded({"x": np.array([[1.0], [2.0]])}, 2)


def test_shadow_drops_rather_than_queues() -> None:
    async def main() -> Metrics:
        metrics = Metrics(process=False)
        settings = ChallengerSettings(mode="shadow", share=1.0, shadow_in_flight=2)
        shadow = Shadow(settings, metrics, 1.0, max_rows=64)
        batcher = _Batcher()
        version = _Version(batcher)
        champion = {"y": np.array([[2.0], [3.0]])}
        started = [shadow.offer(_Call(), version, champion) for _ in range(5)]  # type: ignore[arg-type]
        assert started == [True, True, False, False, False]
        await asyncio.sleep(0)
        batcher.release.set()
        while shadow.in_flight:  # noqa: ASYNC110  (the shadow's tasks are its own: nothing to wait on)
            await asyncio.sleep(0.01)
        busy = _Version(_Batcher(queued=64))  # a full batch already waits in the challenger's queue
        assert not shadow.offer(_Call(), busy, champion)  # type: ignore[arg-type]
        await shadow.close()
        return metrics

    text = generate_latest(asyncio.run(main()).registry).decode()
    assert metric(text, "ferry_challenger_shadow_dropped_total", model="m", reason="in_flight") == 3
    assert metric(text, "ferry_challenger_shadow_dropped_total", model="m", reason="busy") == 1
    # 2 shadow calls of 2 rows: the challenger doubles [1, 2] to [2, 4]; the champion said [2, 3].
    assert metric(text, "ferry_challenger_compared_rows_total", model="m") == 4
    assert metric(text, "ferry_challenger_agreed_rows_total", model="m") == 2
    assert metric(text, "ferry_challenger_difference_count", model="m") == 4


def test_shadow_samples_its_share() -> None:
    async def main() -> int:
        draws = iter([0.05, 0.5, 0.09, 0.95])
        shadow = Shadow(
            ChallengerSettings(mode="shadow", share=0.1),
            Metrics(process=False),
            1.0,
            64,
            draw=lambda: next(draws),
        )
        batcher = _Batcher()
        batcher.release.set()
        started = sum(shadow.offer(_Call(), _Version(batcher), {"y": np.zeros((2, 1))}) for _ in range(4))  # type: ignore[arg-type]
        await shadow.close()
        return started

    assert asyncio.run(main()) == 2


def test_settings_validate() -> None:
    assert Settings().challenger.mode == "off"
    with pytest.raises(ValueError, match="share"):
        Settings(challenger={"share": 1.5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        Settings(challenger={"mode": "blue-green"})  # type: ignore[arg-type]
