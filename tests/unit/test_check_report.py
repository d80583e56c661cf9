"""``ferry check``'s computations, in process: output agreement, accuracy, latency, the policy file and
the checks it makes, decoding a data set to a signature, and the report files."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service.check import measure
from service.check.command import UsageError, against_uri
from service.check.data import DataError, decode_frame, example_inputs, read_table, refit, split_labels
from service.check.policy import Policy, PolicyError, evaluate, load_policy
from service.check.report import latency_svg, markdown, summary, write_report
from service.columns import column_spec
from service.runtime.base import TensorSpec


# ------------------------------------------------------------------------------------------------- measure
def test_labels_agree_row_by_row() -> None:
    result = measure.compare(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), rtol=0, atol=0)
    assert result == {"kind": "labels", "rows": 4, "agreement": 0.75, "disagreeing_rows": 1}


def test_string_labels_compare_value_by_value() -> None:
    a = np.array(["none", "discount", None], dtype=object)
    b = np.array(["none", "call", None], dtype=object)
    assert measure.compare(a, b, rtol=0, atol=0)["agreement"] == pytest.approx(2 / 3)


def test_scores_agree_on_the_argmax_and_report_differences() -> None:
    a = np.array([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    b = np.array([[0.2, 0.8], [0.4, 0.6], [0.2, 0.8]], dtype=np.float32)
    result = measure.compare(a, b, rtol=0, atol=0)
    assert result["kind"] == "scores" and result["agreement"] == pytest.approx(2 / 3)
    assert result["max_abs_diff"] == pytest.approx(0.2) and result["mean_abs_diff"] == pytest.approx(0.6 / 6)
    assert set(result["abs_diff_quantiles"]) == {"p50", "p90", "p99"}


def test_values_agree_within_the_tolerance_and_nan_equals_nan() -> None:
    a = np.array([1.0, 2.0, np.nan, 10.0, np.nan])
    b = np.array([1.0005, 2.5, np.nan, 10.0, 3.0])
    result = measure.compare(a, b, rtol=1e-3, atol=0)
    assert result["kind"] == "values" and result["agreement"] == pytest.approx(3 / 5)
    assert result["max_abs_diff"] == math.inf  # NaN against a number
    assert measure.abs_diff(a, b)[2] == 0.0


def test_predicted_labels_and_the_label_output() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert measure.predicted_labels(scores).tolist() == [1, 0]
    assert measure.predicted_labels(np.array([[1], [0]])).tolist() == [1, 0]
    assert measure.predicted_labels(np.array([0.3, 0.7])) is None  # a regression
    outputs = {"churn_probability": np.array([0.2, 0.9]), "will_churn": np.array([False, True])}
    assert measure.label_output(outputs) == "will_churn"
    assert measure.label_output({"price": np.array([1.5, 2.5])}) == "price"
    assert measure.label_output({"embedding": np.ones((2, 3, 4))}) is None


def test_accuracy_compares_numbers_as_numbers_and_the_rest_as_text() -> None:
    assert measure.accuracy(np.array([True, False, True]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert (
        measure.accuracy(np.array(["yes", "no"], dtype=object), np.array(["yes", "yes"], dtype=object)) == 0.5
    )
    assert measure.accuracy(np.array([1, 0]), np.array(["1", "0"], dtype=object)) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        measure.accuracy(np.array([1, 0]), np.array([1, 0, 1]))


def test_mean_abs_error() -> None:
    assert measure.mean_abs_error(np.array([[1.0], [3.0]]), np.array([2, 3])) == 0.5


def test_latency_quantiles_and_throughput() -> None:
    samples = [0.001] * 99 + [0.101]
    stats = measure.latency(samples, rows=64)
    assert stats["p50_ms"] == pytest.approx(1.0) and stats["requests"] == 100
    assert stats["p99_ms"] == pytest.approx(1.0 + 0.01 * 100, rel=1e-6)  # linear: 1% of the way to 101 ms
    assert stats["mean_ms"] == pytest.approx(2.0)
    assert stats["rows_per_s"] == pytest.approx(64 * 100 / 0.2)


# -------------------------------------------------------------------------------------------------- policy
def test_defaults_are_the_documented_ones() -> None:
    policy = load_policy(None)
    assert (policy.min_agreement, policy.max_accuracy_drop, policy.max_p99_ratio) == (0.99, 0.01, 1.5)
    assert policy.outputs_must_match is True


def test_a_policy_file_changes_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("min_agreement = 0.95\nmax_p99_ratio = 2\noutputs_must_match = false\n")
    policy = load_policy(path)
    assert policy == Policy(min_agreement=0.95, max_p99_ratio=2.0, outputs_must_match=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_agrement = 0.9\n", "unknown key(s) ['min_agrement']"),
        ("min_agreement = '0.9'\n", "min_agreement must be a number"),
        ("min_agreement = 1.5\n", "min_agreement must be between 0 and 1"),
        ("max_p99_ratio = -1\n", "max_p99_ratio must be at least 0"),
        ("max_p99_ratio = true\n", "max_p99_ratio must be a number"),
        ("outputs_must_match = 1\n", "outputs_must_match must be true or false"),
        ("min_agreement = \n", "not TOML"),
    ],
)
def test_a_bad_policy_file_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert message in info.value.message and str(path) in info.value.message


def test_a_missing_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "none.toml")


def _side(
    accuracy: float | None = None, p99: float = 1.0, width: int = 10, name: str = "output"
) -> dict[str, Any]:
    return {
        "uri": "models:/m/1",
        "outputs": [{"name": name, "dtype": "float32", "shape": [-1, width], "kind": "scores"}],
        "accuracy": accuracy,
        "mean_abs_error": None,
        "latency": {"batch_1": {"rows": 1, "p99_ms": p99}, "batch_64": {"rows": 64, "p99_ms": p99 * 4}},
    }


def _result(
    candidate: dict[str, Any], against: dict[str, Any] | None, agreement: float = 1.0
) -> dict[str, Any]:
    return {
        "candidate": candidate,
        "against": against,
        "agreement": {"output": {"kind": "scores", "rows": 100, "agreement": agreement}} if against else {},
    }


def _failed(checks: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in checks if not c["passed"]]


def test_equal_versions_pass_every_check() -> None:
    checks = evaluate(_result(_side(0.9), _side(0.9)), Policy())
    assert [c["name"] for c in checks] == [
        "outputs", "agreement.output", "accuracy_drop", "p99_ratio.batch_1", "p99_ratio.batch_64",
    ]  # fmt: skip
    assert _failed(checks) == []


def test_each_threshold_fails_its_own_check() -> None:
    assert _failed(evaluate(_result(_side(), _side(), agreement=0.98), Policy())) == ["agreement.output"]
    assert _failed(evaluate(_result(_side(0.85), _side(0.9)), Policy())) == ["accuracy_drop"]
    assert _failed(evaluate(_result(_side(0.895), _side(0.9)), Policy())) == []
    assert _failed(evaluate(_result(_side(width=5), _side()), Policy())) == ["outputs"]
    assert _failed(evaluate(_result(_side(name="logits"), _side()), Policy())) == ["outputs"]
    assert _failed(evaluate(_result(_side(name="logits"), _side()), Policy(outputs_must_match=False))) == []


def test_latency_fails_on_the_ratio_only_beyond_the_absolute_floor() -> None:
    # x3 but only 0.2 ms more at 1 row, 0.8 ms more at 64 rows: under the 1 ms floor
    assert _failed(evaluate(_result(_side(p99=0.3), _side(p99=0.1)), Policy())) == []
    slow = evaluate(_result(_side(p99=3.0), _side(p99=1.0)), Policy())
    assert _failed(slow) == ["p99_ratio.batch_1", "p99_ratio.batch_64"]
    assert next(c for c in slow if c["name"] == "p99_ratio.batch_1")["value"] == pytest.approx(3.0)
    assert _failed(evaluate(_result(_side(p99=3.0), _side(p99=1.0)), Policy(max_p99_ratio=4))) == []


def test_without_a_compared_version_only_the_candidates_own_accuracy_is_checked() -> None:
    assert evaluate(_result(_side(0.7), None), Policy()) == []
    checks = evaluate(_result(_side(0.7), None), Policy(min_accuracy=0.8))
    assert _failed(checks) == ["accuracy"]


def test_a_regression_is_judged_by_its_error_ratio() -> None:
    mine, theirs = _side(), _side()
    mine["mean_abs_error"], theirs["mean_abs_error"] = 1.2, 1.0
    assert "error_ratio" in _failed(evaluate(_result(mine, theirs), Policy()))
    assert "error_ratio" not in _failed(evaluate(_result(mine, theirs), Policy(max_error_ratio=1.25)))


# --------------------------------------------------------------------------------------------------- data
TABLE = [
    column_spec("tenure", "long"),
    column_spec("contract", "string"),
    column_spec("paperless", "boolean"),
    column_spec("note", "string", required=False),
]


def test_a_table_is_decoded_as_a_request_and_unknown_columns_are_left_out() -> None:
    frame = pd.DataFrame(
        {"id": ["a", "b"], "tenure": [3, 4], "contract": ["one-year", "two-year"], "paperless": [True, False]}
    )
    inputs = decode_frame(TABLE, frame, "d.csv")
    assert inputs.rows == 2 and inputs.ignored == ["id"]
    assert inputs.arrays["tenure"].dtype == np.int64 and inputs.arrays["contract"].tolist() == [
        "one-year",
        "two-year",
    ]
    assert "note" not in inputs.arrays  # optional and absent: left out, as MLflow leaves it out
    assert inputs.take(np.array([1, 1, 0]))["tenure"].tolist() == [4, 4, 3]


def test_a_table_cell_of_the_wrong_type_names_the_column() -> None:
    frame = pd.DataFrame({"tenure": ["x", "y"], "contract": ["a", "b"], "paperless": [True, False]})
    with pytest.raises(DataError, match=r"d\.csv: column 'tenure'"):
        decode_frame(TABLE, frame, "d.csv")
    with pytest.raises(DataError, match=r"missing required column\(s\) \['paperless'\]"):
        decode_frame(TABLE, frame.drop(columns=["paperless"]), "d.csv")


def test_a_tensor_input_from_value_columns_or_a_column_of_tensors() -> None:
    spec = [TensorSpec("input", np.dtype(np.float32), (-1, 2, 2))]
    flat = pd.DataFrame(np.arange(8).reshape(2, 4), columns=list("abcd"))
    inputs = decode_frame(spec, flat, "d.parquet")
    assert inputs.arrays["input"].shape == (2, 2, 2) and inputs.arrays["input"].dtype == np.float32
    nested = pd.DataFrame({"input": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]], "extra": [0, 1]})
    inputs = decode_frame(spec, nested, "d.jsonl")
    assert inputs.arrays["input"][1].tolist() == [[5, 6], [7, 8]] and inputs.ignored == ["extra"]
    with pytest.raises(DataError, match=r"takes rows of shape \[-1, 2, 2\]; give 4 value columns"):
        decode_frame(spec, flat.drop(columns=["d"]), "d.parquet")
    with pytest.raises(DataError, match="different shapes"):
        decode_frame(spec, pd.DataFrame({"input": [[[1, 2], [3, 4]], [[5, 6]]]}), "d.jsonl")


def test_the_example_of_a_tensor_model_and_its_refit_for_another_signature() -> None:
    spec = [TensorSpec("input", np.dtype(np.float32), (-1, 3))]
    zeros = example_inputs(spec, None)
    assert zeros is not None and zeros.rows == 1 and zeros.arrays["input"].tolist() == [[0, 0, 0]]
    assert example_inputs(TABLE, None) is None  # a table's zeros mean nothing: give --data
    example = example_inputs(spec, {"input": np.ones((2, 3), dtype=np.float64)})
    assert example is not None and example.arrays["input"].dtype == np.float32
    with pytest.raises(DataError, match="the compared version does not take the example"):
        refit([TensorSpec("input", np.dtype(np.float32), (-1, 4))], example, "the example")


def test_data_files_by_suffix_and_labels(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.5, 2.5], "y": [0, 1]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        features, labels = split_labels(read_table(tmp_path / name), "y", name)
        assert list(features.columns) == ["a"] and labels is not None and labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"give a \.csv, \.parquet or \.jsonl file"):
        read_table(tmp_path / "d.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot be read as parquet"):
        read_table(tmp_path / "broken.parquet")
    with pytest.raises(DataError, match="no label column 'z'"):
        split_labels(frame, "z", "d.csv")


def test_against_is_an_alias_of_the_candidates_model_or_a_uri() -> None:
    assert against_uri("models:/churn/3", None) == ("models:/churn@champion", False)
    assert against_uri("models:/churn@challenger", "prod") == ("models:/churn@prod", True)
    assert against_uri("models:/churn/3", "models:/other/1") == ("models:/other/1", True)
    assert against_uri("/models/churn", None) == (None, False)
    assert against_uri("/models/churn", "/models/old") == ("/models/old", True)
    with pytest.raises(UsageError, match="an alias needs a registered candidate"):
        against_uri("runs:/abc/model", "champion")


# ------------------------------------------------------------------------------------------------- report
def _full_result(passed: bool) -> dict[str, Any]:
    candidate, against = _side(0.81), _side(0.9)
    for side, version in ((candidate, "2"), (against, "1")):
        side |= {"version": version, "flavor": "onnx", "load_s": 0.5, "rss_delta_bytes": 3 * 2**20}
        side |= {"runtime": "onnxruntime", "device": "cpu", "label_output": "output", "mean_abs_error": None}
        for stats in side["latency"].values():
            stats |= {"p50_ms": stats["p99_ms"] / 2, "mean_ms": stats["p99_ms"] / 2, "rows_per_s": 1000.0}
    result = _result(candidate, against, agreement=0.97)
    result["agreement"]["output"] |= {
        "max_abs_diff": math.inf,
        "mean_abs_diff": 0.1,
        "abs_diff_quantiles": {},
    }
    result |= {
        "ferry_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "batch_max_rows": 64, "requests": 10,
        "data": {"source": "d.csv", "rows": 100, "label": "y", "ignored_columns": ["id"]},
    }  # fmt: skip
    result["checks"] = evaluate(result, Policy())
    result["passed"] = passed
    return result


def test_the_report_files_hold_the_numbers(tmp_path: Path) -> None:
    result = _full_result(passed=False)
    files = write_report(tmp_path / "out", result)
    assert [f.name for f in files] == ["report.md", "report.json", "latency.svg"]
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["agreement"]["output"]["max_abs_diff"] == "inf"  # JSON has no infinity
    assert data["candidate"]["accuracy"] == 0.81
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("# ferry check: FAILED")
    assert (
        "| `accuracy_drop` | **FAIL** |" in text and "| `agreement.output` | **FAIL** | 0.97 | 0.99 |" in text
    )
    assert "| candidate | 64 | 2.000 | 4.000 | 2.000 | 1,000 |" in text and "+3.0 MiB" in text
    assert "['id']" in text
    svg = ET.fromstring((tmp_path / "out" / "latency.svg").read_text())
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "4.000 (candidate)" in labels and "1 row p99" in labels and "64 rows p50" in labels
    printed = summary(result, files)
    assert "FAILED accuracy_drop:" in printed and "checks: 3 passed, 2 failed" in printed


def test_a_report_without_a_compared_version(tmp_path: Path) -> None:
    result = _full_result(passed=True)
    result["against"], result["agreement"], result["checks"] = None, {}, []
    assert "only the candidate's own checks ran" in markdown(result)
    assert "compared" not in latency_svg(result)
    assert "(nothing to compare)" in summary(result, [])


def test_outputs_pair_by_name_else_by_position() -> None:
    from service.check.command import _pairs

    assert _pairs(["a", "b"], ["b", "a"]) == [("a", "a"), ("b", "b")]
    assert _pairs(["logits"], ["output"]) == [("logits", "output")]  # renamed by an export: still compared
    assert _pairs(["a", "c"], ["a"]) == [("a", "a")]
    assert _pairs(["x"], ["y", "z"]) == []
