"""Golden responses: the requests of ``tests/golden/record.py``, replayed in the same order against a real
Ferry of the current code serving the same (freshly built, deterministic) registry, get byte-identical
bodies, the same statuses and the same client-visible headers as the code they were recorded from
(``tests/golden/responses.json``; its ``meta`` names the commit). The request pipeline's redesign
(issue 12) must not change anything a client of any of the three protocols sees.

Compared exactly: the status, the whole body (bytes), and the headers in ``record.HEADERS`` (present or
absent alike). Nothing is normalised: two recordings from the same code are byte-identical (no body holds
a timestamp, a load time, a run id or a temporary path; the float outputs are reproducible because the
weights are fixed or seeded, each request runs alone on one intra-op thread, on the CPU). Not compared:
``date`` and ``server`` (uvicorn's), and any header outside ``record.HEADERS``.

A change that is meant to be visible re-records the file (see ``record.py``) in the same commit, which
the diff of ``responses.json`` then shows.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "golden"))
import record

pytestmark = pytest.mark.integration

RECORDING: dict[str, Any] = json.loads(record.GOLDEN.read_text())
EXCHANGES: list[dict[str, Any]] = RECORDING["exchanges"]


def test_the_recording_holds_every_request_of_the_recorder_in_order() -> None:
    """A request added to (or changed in) ``record.exchanges()`` needs a new recording from the old code."""
    assert [e["request"] for e in EXCHANGES] == record.exchanges(), (
        "tests/golden/record.py's requests differ from responses.json: record again from the code "
        "before the change (see record.py's docstring)"
    )
    assert len(EXCHANGES) >= 40


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import mlflow

    previous = mlflow.get_tracking_uri()  # the session registry's, which other tests rely on
    workdir = tmp_path_factory.mktemp("golden")
    try:
        registry = record.build(workdir / "registry")
    finally:
        mlflow.set_tracking_uri(previous)
    for name in record.SERVERS:
        (workdir / name).mkdir()
    return list(record.replay([e["request"] for e in EXCHANGES], registry, workdir))


@pytest.mark.parametrize("index", range(len(EXCHANGES)), ids=[e["request"]["name"] for e in EXCHANGES])
def test_same_answer_as_recorded(replayed: list[dict[str, Any]], index: int) -> None:
    request, want = EXCHANGES[index]["request"], EXCHANGES[index]["response"]
    got = replayed[index]
    where = f"{request['method']} {request['path']} ({request['name']}, server {request['server']!r})"
    assert got["status"] == want["status"], f"{where}: status\n{got.get('body_text', '')[:500]}"
    assert got["headers"] == want["headers"], f"{where}: headers"
    if "body_text" in want:  # readable diff first; the bytes decide
        assert got.get("body_text") == want["body_text"], f"{where}: body"
    assert record.response_body(got) == record.response_body(want), f"{where}: body bytes"


def test_the_recorded_bodies_are_what_their_text_says() -> None:
    """``body_text`` is only a readable copy: it must decode from the compared bytes."""
    for exchange in EXCHANGES:
        response = exchange["response"]
        if "body_text" in response:
            assert record.response_body(response) == response["body_text"].encode(), exchange["request"]
