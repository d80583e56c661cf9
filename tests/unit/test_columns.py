"""Tables (DataFrame signatures) along Ferry's path: decoding every form a client sends, refusing bad
cells by column, keying them in the cache, handing the model a DataFrame and rendering what it returns
as MLflow does. The real MLflow path (scikit-learn, custom pyfunc models) is tests/integration/
test_flavors.py."""

from __future__ import annotations

import asyncio
import base64
import tracemalloc
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service.api.frames import csv_inputs, payload_inputs
from service.api.protocols.mlflow import predictions
from service.batcher import Batcher
from service.cache import cache_key
from service.columns import POSITIONAL, column_spec, decode_inputs
from service.errors import InvalidInput, ModelRejected
from service.runtime.base import TENSORS, OutputForm
from service.runtime.pyfunc import PyfuncRuntime

SPECS = [
    column_spec("tenure", "long"),
    column_spec("charges", "double"),
    column_spec("contract", "string"),
    column_spec("paperless", "boolean"),
    column_spec("note", "string", required=False),
]
RECORD = {"tenure": 3, "charges": 80.5, "contract": "monthly", "paperless": True}


def decode(raw: Any, **kw: Any) -> dict[str, np.ndarray]:
    arrays, rows = decode_inputs(SPECS, raw, **kw)
    assert all(a.shape == (rows,) for a in arrays.values())
    return arrays


def refused(raw: Any, **kw: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        decode_inputs(SPECS, raw, **kw)
    return caught.value


def test_records_columns_and_rows_decode_to_the_same_typed_columns() -> None:
    records = decode([RECORD, {**RECORD, "tenure": 40, "contract": "yearly"}])
    columns = decode(
        {k: [v, v] for k, v in RECORD.items()} | {"tenure": [3, 40], "contract": ["monthly", "yearly"]}
    )
    rows = decode([[3, 80.5, "monthly", True, None], [40, 80.5, "yearly", True, None]])
    for arrays in (records, columns):
        assert list(arrays) == ["tenure", "charges", "contract", "paperless"]  # signature order
        assert [a.dtype for a in arrays.values()] == [np.int64, np.float64, object, np.bool_]
        assert arrays["contract"].tolist() == ["monthly", "yearly"]
        assert arrays["tenure"].tolist() == [3, 40]
    assert rows["note"].tolist() == [None, None]  # an optional column may hold nulls


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([{k: v for k, v in RECORD.items() if k != "contract"}], "missing required column(s) ['contract']"),
        ([{**RECORD, "charges": None}], "column 'charges' is required but row 0 holds null"),
        ([{**RECORD, "zzz": 1}], "unknown column(s) ['zzz']"),
        ([{**RECORD, "tenure": "3"}], "column 'tenure': expected long values, got strings"),
        ([{**RECORD, "tenure": 3.5}], "column 'tenure': expected long values, got 3.5 in row 0"),
        ([{**RECORD, "contract": 7}], "column 'contract': expected strings, got a number in row 0"),
        ([{**RECORD, "paperless": "yes"}], "column 'paperless': expected boolean values, got strings"),
        ([{**RECORD, "charges": [1.0]}], "column 'charges': expected one double value per row"),
        ({**{k: [v] for k, v in RECORD.items()}, "tenure": [1, 2]}, "inputs disagree on the number of rows"),
        ("text", "inputs: expected a table"),
        ([{**RECORD, "tenure": 2**63}], "column 'tenure'"),
    ],
)
def test_bad_cells_are_refused_naming_the_column(raw: Any, words: str) -> None:
    assert words in refused(raw).message


def test_mlflow_ignores_unknown_columns_and_a_missing_optional_column_stays_out() -> None:
    arrays = decode([{**RECORD, "zzz": 1}], unknown="ignore")
    assert "zzz" not in arrays and "note" not in arrays
    assert decode([{**RECORD, "tenure": 3.0}])["tenure"].tolist() == [3]  # a whole float is an integer


def test_optional_numbers_with_nulls_are_nan_as_pandas_makes_them() -> None:
    specs = [column_spec("a", "long", required=False), column_spec("b", "float", required=False)]
    arrays, rows = decode_inputs(specs, {"a": [1, None], "b": [None, 2.5]})
    assert rows == 2
    assert arrays["a"].dtype == np.float64 and np.isnan(arrays["a"][1]) and arrays["a"][0] == 1
    assert arrays["b"].dtype == np.float32 and np.isnan(arrays["b"][0]) and arrays["b"][1] == 2.5


def test_binary_datetime_and_complex_columns() -> None:
    specs = [column_spec("blob", "binary"), column_spec("at", "datetime"), column_spec("tags", "array")]
    arrays, _ = decode_inputs(
        specs,
        [{"blob": base64.b64encode(b"\x00\xff").decode(), "at": "2026-12-02T10:00:00", "tags": ["a", "b"]}],
    )
    assert arrays["blob"].tolist() == [b"\x00\xff"]
    assert arrays["at"].dtype == np.dtype("datetime64[ns]")
    assert arrays["tags"].shape == (1,) and arrays["tags"][0] == ["a", "b"]
    with pytest.raises(InvalidInput, match="column 'blob': row 0 is not base64"):
        decode_inputs(specs, [{"blob": "***", "at": "2026-12-02", "tags": []}])
    with pytest.raises(InvalidInput, match="column 'at': not an ISO 8601 date-time"):
        decode_inputs(specs, [{"blob": "", "at": "yesterday", "tags": []}])


def test_v2_bytes_and_column_shapes_of_mlserver_pandas_codec() -> None:
    from service.api.tensors import decode_inputs as v2_decode

    specs = [column_spec("contract", "string"), column_spec("tenure", "long")]
    tensors = [
        {"name": "contract", "datatype": "BYTES", "shape": [2, 1], "data": ["monthly", "yearly"]},
        {"name": "tenure", "datatype": "INT64", "shape": [2], "data": [3, 40]},
    ]
    arrays = v2_decode(specs, tensors, memoryview(b""))
    assert arrays["contract"].tolist() == ["monthly", "yearly"] and arrays["tenure"].tolist() == [3, 40]
    tensors[1]["datatype"] = "FP64"
    tensors[1]["data"] = [3.5, 1.0]
    with pytest.raises(InvalidInput, match="column 'tenure'"):
        v2_decode(specs, tensors, memoryview(b""))


def test_mlflow_payloads_and_csv_decode_to_the_same_table() -> None:
    columns = ["tenure", "charges", "contract", "paperless"]
    split = payload_inputs(
        SPECS, {"dataframe_split": {"columns": columns, "data": [[3, 80.5, "monthly", True]]}}
    )
    records = payload_inputs(SPECS, {"dataframe_records": [RECORD]})
    instances = payload_inputs(SPECS, {"instances": [RECORD]})
    csv = csv_inputs(SPECS, b"tenure,charges,contract,paperless\n3,80.5,monthly,True\n")
    for value in (split, records, instances, csv):
        arrays = decode(value, unknown="ignore")
        assert arrays["tenure"].tolist() == [3] and arrays["contract"].tolist() == ["monthly"]
        assert arrays["paperless"].tolist() == [True] and arrays["charges"].tolist() == [80.5]
    blank = csv_inputs(SPECS, b"tenure,charges,contract,paperless\n3,,monthly,True\n")
    with pytest.raises(InvalidInput, match="column 'charges' is required but row 0 holds null"):
        decode(blank)


def test_a_long_string_costs_its_size_not_its_size_times_the_rows() -> None:
    """numpy sizes a fixed-width string array by its longest value: 100,000 characters among 10,000
    rows would take 4 GB. A column of strings holds references instead; a numeric column refuses the
    string before any such array exists."""
    rows = 10_000
    body_bytes = 100_000 + rows * 8
    long_text = "x" * 100_000
    for column, fill in (("contract", "monthly"), ("tenure", 1)):
        table = {k: [v] * rows for k, v in RECORD.items()}
        table[column] = [fill] * (rows - 1) + [long_text]
        tracemalloc.start()
        try:
            with pytest.raises(InvalidInput) if column == "tenure" else _nothing():
                decode(table)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * body_bytes, (column, peak)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_cache_keys_tell_string_columns_apart() -> None:
    def key(values: list[Any]) -> bytes:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return cache_key("m", "models:/m/1", {"c": array}, None)

    keys = [key(["ab", "c"]), key(["a", "bc"]), key(["", None]), key([None, ""]), key([b"ab", "c"])]
    assert len(set(keys)) == len(keys)
    assert key(["ab", "c"]) == key(["ab", "c"])
    with pytest.raises(TypeError):
        key([{"a": 1}, "c"])


def test_the_model_gets_a_dataframe_in_signature_order_and_its_output_form_is_kept() -> None:
    seen: list[pd.DataFrame] = []

    def predict(frame: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        seen.append(frame)
        return pd.DataFrame({"label": ["stay"] * len(frame), "score": np.full(len(frame), 0.25)})

    runtime = PyfuncRuntime(predict, [s.name for s in SPECS], "output", table=True)
    out = runtime.predict_batch(decode([RECORD, RECORD]))
    assert list(seen[0].columns) == ["tenure", "charges", "contract", "paperless"]
    assert seen[0]["contract"].tolist() == ["monthly", "monthly"]
    assert runtime.output_form == OutputForm("frame")
    assert out["label"].dtype == object and out["score"].tolist() == [0.25, 0.25]

    runtime = PyfuncRuntime(lambda f: pd.Series([1, 2], name="p"), ["a"], "output", table=True)
    runtime.predict_batch({"a": np.array([1, 2])})
    assert runtime.output_form == OutputForm("series", "p")
    runtime = PyfuncRuntime(lambda f: ["x", "y"], ["a"], "output", table=True)
    assert runtime.predict_batch({"a": np.array([1, 2])})["output"].dtype == object
    assert runtime.output_form == TENSORS


def test_a_model_without_signature_gets_the_array_or_the_frame() -> None:
    got: list[Any] = []
    runtime = PyfuncRuntime(lambda x: got.append(x) or np.zeros(len(x)), [], "output")
    arrays, _ = decode_inputs([], [[1.0, 2.0], [3.0, 4.0]])
    runtime.predict_batch(arrays)
    assert list(arrays) == [POSITIONAL] and isinstance(got[-1], np.ndarray)
    arrays, _ = decode_inputs([], [{"a": 1, "b": "x"}])
    runtime.predict_batch(arrays)
    assert isinstance(got[-1], pd.DataFrame) and got[-1]["b"].tolist() == ["x"]


def test_what_the_model_refuses_is_the_clients_error() -> None:
    def predict(frame: pd.DataFrame) -> Any:
        raise ValueError("could not convert string to float: 'abc'")

    with pytest.raises(ModelRejected, match="the model rejected the input: could not convert"):
        PyfuncRuntime(predict, [], "output").predict_batch({"a": np.array([1])})


def test_mlflow_predictions_render_each_output_form_as_mlflow_does() -> None:
    def answer(outputs: dict[str, np.ndarray], form: OutputForm) -> Any:
        from types import SimpleNamespace

        return predictions(SimpleNamespace(outputs=outputs, form=form, flavor="pyfunc"))  # type: ignore[arg-type]

    frame = {"label": np.array(["a", "b"], dtype=object), "score": np.array([0.5, 0.25])}
    assert answer(frame, OutputForm("frame")) == [{"label": "a", "score": 0.5}, {"label": "b", "score": 0.25}]
    assert answer({"output": np.array([1, 2])}, OutputForm("series", "0")) == [{"0": 1}, {"0": 2}]
    assert answer({"output": np.array([1, 2])}, TENSORS).tolist() == [1, 2]
    assert set(answer({"p": np.array([1]), "q": np.array([2])}, OutputForm("dict"))) == {"p", "q"}


def test_one_bad_request_in_a_batch_fails_alone_and_tables_without_a_column_batch_apart() -> None:
    batches: list[list[str]] = []

    def run(inputs: Any, params: Any) -> dict[str, np.ndarray]:
        batches.append(sorted(inputs))
        if (inputs["a"] < 0).any():
            raise ValueError("negative")
        return {"y": inputs["a"] * 2}

    async def main() -> list[Any]:
        batcher = Batcher(run, max_rows=64, queue_rows=256, max_wait_s=0.05)
        try:
            calls = [
                batcher.submit({"a": np.array([1])}, 1, 5.0),
                batcher.submit({"a": np.array([-1])}, 1, 5.0),
                batcher.submit({"a": np.array([3]), "b": np.array([0])}, 1, 5.0),
                batcher.submit({"a": np.array([4])}, 1, 5.0),
            ]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert results[0].outputs["y"].tolist() == [2] and results[3].outputs["y"].tolist() == [8]
    assert isinstance(results[1], Exception)
    assert results[2].outputs["y"].tolist() == [6]
    assert all(b == ["a"] or b == ["a", "b"] for b in batches)
    assert ["a", "b"] in batches
