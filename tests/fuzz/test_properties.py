"""Hypothesis: any JSON value, as inputs or as a whole body, is answered with 200 or a 4xx, never an
exception, and a body that decodes always matches the signature exactly."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server
from service.errors import InvalidInput
from service.runtime.base import TensorSpec
from service.signature import decode_inputs

SPECS = [TensorSpec("x", np.dtype(np.float32), (-1, 3))]
TWO = [TensorSpec("a", np.dtype(np.float32), (-1, 2)), TensorSpec("b", np.dtype(np.int64), (-1,))]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=20,
)
rows = st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3), min_size=1, max_size=5)


@given(json_values)
def test_any_json_value_decodes_or_is_invalid_input(value: Any) -> None:
    for specs in (SPECS, TWO):
        try:
            arrays, count = decode_inputs(specs, value)
        except InvalidInput as exc:
            assert exc.status == 422 and exc.message
            continue
        for spec in specs:
            assert arrays[spec.name].dtype == spec.dtype and arrays[spec.name].shape[0] == count


@given(rows)
def test_valid_rows_round_trip_exactly(value: list[list[float]]) -> None:
    arrays, count = decode_inputs(SPECS, value)
    assert count == len(value)
    assert arrays["x"].tolist() == np.array(value, dtype=np.float32).tolist()


@pytest.mark.integration
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values, where=st.sampled_from(["/predict", "/models/linear/predict", "/invocations"]))
def test_any_json_body_gets_200_or_4xx(ferry_server: Server, body: Any, where: str) -> None:
    r = httpx.post(
        f"{ferry_server.url}{where}", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
