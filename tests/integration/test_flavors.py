"""Every pyfunc flavor a data scientist registers (issue 13, part 2), served by a real Ferry and answered
as MLflow answers: the models of ``models/tabular.py`` (a scikit-learn ``Pipeline`` with a
``ColumnTransformer`` saved as skops, the same with ``predict_proba``, a ``PythonModel`` over DataFrames
with params, a models-from-code pyfunc with a datetime column, a LightGBM ``Booster``), each logged to a
fresh sqlite registry and compared with ``mlflow.pyfunc.load_model(uri).predict`` on the same rows:

- ``/invocations`` in every form (``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``,
  CSV) answers exactly what MLflow's scoring server answers (its own code, in this process), and for the
  scikit-learn model what a real ``mlflow models serve`` answers;
- ``/predict`` takes records and columns, ``/v2/.../infer`` one input per column, and both answer the
  model's values (named columns for a DataFrame output);
- bad input (a missing column, a string in a numeric column, a null in a required column) is a 422
  naming the column on ``/predict`` and MLflow's status and error code on ``/invocations``;
- the models that MLflow loads only through pickle (skops, cloudpickle) are refused unless
  ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``; the others load without it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import procs
import pytest
import tabular

from conftest import Registry, Server, free_port, start_server, stop_server, wait_until_ready

pytestmark = pytest.mark.integration

HAS_LIGHTGBM = importlib.util.find_spec("lightgbm") is not None
NAMES = [n for n in tabular.LOGGERS if n != "churn-lightgbm" or HAS_LIGHTGBM]
MODELS = [
    pytest.param(n, marks=pytest.mark.skipif(n not in NAMES, reason="lightgbm is not installed"))
    for n in tabular.LOGGERS
]
PARAMS: dict[str, dict[str, Any]] = {
    "churn-pyfunc": {"threshold": 0.3, "offer": "call"},
    "churn-code": {"horizon_months": 24},
}
"""Non-default params of the models that take params."""
FLAVORS = "sklearn,lightgbm,python_function"
"""The loaders of these models, for ``FERRY_ALLOWED_FLAVORS`` (Ferry's default allows onnx and pytorch)."""
ALLOW = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true", "FERRY_ALLOWED_FLAVORS": FLAVORS}
V2_TYPES = {"long": "INT64", "double": "FP64", "boolean": "BOOL", "string": "BYTES", "datetime": "BYTES"}


# ---------------------------------------------------------------------------------------------------- fixtures
@dataclass
class Flavors:
    """The registered models, MLflow's own pyfunc of each, and each model's test rows."""

    registry: Registry
    models: dict[str, Any] = field(default_factory=dict)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)

    def uri(self, name: str) -> str:
        return f"models:/{name}/1"


def unseen_rows(name: str, rows: int = 7, seed: int = 11) -> pd.DataFrame:
    """Customers the models never saw, one of them on a contract unknown to training (``three-year``),
    in the columns of ``name``'s signature."""
    if name == "churn-code":
        frame = tabular.code_frame(rows, seed)
    else:
        frame = tabular.churn_frame(rows, seed)[0]
        frame = frame[list(tabular.BOOSTER_COLUMNS if name == "churn-lightgbm" else tabular.COLUMNS)]
    if "contract" in frame:
        frame.loc[2, "contract"] = "three-year"
    return frame


@pytest.fixture(scope="module")
def flavors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flavors]:
    """Each model of ``models/tabular.py`` trained, logged and registered as version 1 (alias
    ``champion``) in a fresh registry, and loaded by MLflow (which allows pickle by default)."""
    import mlflow

    root = tmp_path_factory.mktemp("flavors")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("flavors", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        flavors = Flavors(Registry(root=root, tracking_uri=uri))
        for name in NAMES:
            assert tabular.log_and_register(name) == "1"
            flavors.models[name] = mlflow.pyfunc.load_model(flavors.uri(name))
            flavors.frames[name] = unseen_rows(name)
        yield flavors
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def servers(flavors: Flavors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """One Ferry serving every model (their flavors allowed, and pickle: the skops and cloudpickle models
    need it) and ``mlflow models serve`` on ``churn-sklearn``, started side by side."""
    work = tmp_path_factory.mktemp("ferry-flavors")
    models = ",".join(f"{n}=models:/{n}@champion" for n in NAMES)
    ferry = start_server(flavors.registry, models, work, ALLOW, wait_ready=False)
    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    argv = [mlflow_cli, "models", "serve", "-m", flavors.uri("churn-sklearn"), "--env-manager", "local"]
    argv += ["-h", "127.0.0.1", "-p", str(port)]
    env = {k: v for k, v in procs.venv_env().items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= flavors.registry.env() | {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    mlflow_server = procs.launch(
        "mlflow", argv, work / f"mlflow-{port}.log", url=f"http://127.0.0.1:{port}", env=env, cwd=work
    )
    try:
        wait_until_ready(ferry, timeout_s=240)
        procs.wait_ready(mlflow_server, "/ping", 240)
        yield {"ferry": ferry, "mlflow": mlflow_server}
    finally:
        stop_server(mlflow_server)
        stop_server(ferry)


@pytest.fixture(scope="module")
def ferry(servers: dict[str, Server]) -> Server:
    return servers["ferry"]


# ----------------------------------------------------------------------------------------------------- helpers
def jsonable(value: Any) -> Any:
    """A cell as a client sends it: plain numbers and bools, strings, datetimes in ISO 8601."""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{c: jsonable(v) for c, v in row.items()} for row in frame.to_dict(orient="records")]


def columns(frame: pd.DataFrame) -> dict[str, list[Any]]:
    return {c: [jsonable(v) for v in frame[c]] for c in frame.columns}


def split(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "columns": list(frame.columns),
        "data": [[jsonable(v) for v in row] for row in frame.itertuples(False)],
    }


def mlflow_answer(model: Any, body: str, content_type: str = "application/json") -> tuple[int, Any]:
    """What ``mlflow models serve`` answers: MLflow's own scoring function, in this process. An error is
    (its HTTP status, its error code)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        result = scoring_server.invocations(body, content_type, model, model.metadata.get_input_schema())
    except MlflowException as exc:
        return exc.get_http_status_code(), exc.error_code
    assert result.status == 200, result.response
    return 200, json.loads(result.response)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Same JSON structure and keys; floats equal within float64 tolerance, everything else (integers,
    bools, strings, nulls) exactly and of the same JSON type."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, bool) or want is None or isinstance(want, str):
        assert got == want and type(got) is type(want), (where, got, want)
    elif isinstance(want, int):  # a label: an integer, not a float that equals it
        assert got == want and type(got) is int, (where, got, want)
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), (where, got, want)
    else:
        assert isinstance(got, int | float) and not isinstance(got, bool), (where, got, want)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (where, got, want)


def outputs_of(prediction: Any) -> Any:
    """A pyfunc prediction as ``/predict`` answers it: a DataFrame's named columns as ``{column:
    values}``, any other output as its rows."""
    if isinstance(prediction, pd.DataFrame):
        return {c: prediction[c].tolist() for c in prediction.columns}
    if isinstance(prediction, pd.Series):
        return prediction.tolist()
    return np.asarray(prediction).tolist()


def invocations(
    server: Server, name: str, body: Any, content_type: str = "application/json"
) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/models/{name}/invocations",
        content=content,
        headers={"Content-Type": content_type},
        timeout=60,
    )


def predict(server: Server, name: str, inputs: Any, params: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"model": name, "inputs": inputs}
    if params is not None:
        body["params"] = params
    return httpx.post(f"{server.url}/predict", json=body, timeout=60)


def v2_inputs(model: Any, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One v2 input per column of the signature: its name, ``[rows]``, its datatype (strings and
    datetimes as BYTES)."""
    out = []
    for spec in model.metadata.get_input_schema().inputs:
        datatype = V2_TYPES[spec.type.name]
        data = [jsonable(v) for v in frame[spec.name]]
        out.append({"name": spec.name, "shape": [len(frame)], "datatype": datatype, "data": data})
    return out


# ------------------------------------------------------------------------------------------------------ /invocations
def form_bodies(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "dataframe_split": {"dataframe_split": split(frame)},
        "dataframe_records": {"dataframe_records": records(frame)},
        "instances": {"instances": records(frame)},
        "inputs-records": {"inputs": records(frame)},
        "inputs-columns": {"inputs": columns(frame)},
    }


FORMS = ["dataframe_split", "dataframe_records", "instances", "inputs-records", "inputs-columns"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", MODELS)
def test_invocations_answer_as_mlflow_does(flavors: Flavors, ferry: Server, name: str, form: str) -> None:
    model, frame = flavors.models[name], flavors.frames[name]
    body = form_bodies(frame)[form]
    status, want = mlflow_answer(model, json.dumps(body))
    assert status == 200, want
    r = invocations(ferry, name, body)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "1"
    assert_same(r.json(), want)
    # and MLflow's answer is the model's prediction
    assert_same(want["predictions"], _mlflow_jsonable(model.predict(frame)))


def _mlflow_jsonable(prediction: Any) -> Any:
    """A prediction as MLflow's scoring server writes it (a DataFrame and a named Series as records)."""
    if isinstance(prediction, pd.Series) and prediction.name is not None:
        prediction = prediction.to_frame()
    if isinstance(prediction, pd.DataFrame):
        return [{k: jsonable(v) for k, v in row.items()} for row in prediction.to_dict(orient="records")]
    return np.asarray(prediction).tolist()


@pytest.mark.parametrize("name", list(PARAMS))
def test_invocations_params_reach_the_model(flavors: Flavors, ferry: Server, name: str) -> None:
    model, frame = flavors.models[name], flavors.frames[name]
    body = {"dataframe_split": split(frame), "params": PARAMS[name]}
    status, want = mlflow_answer(model, json.dumps(body))
    assert status == 200, want
    r = invocations(ferry, name, body)
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)
    assert_same(want["predictions"], _mlflow_jsonable(model.predict(frame, params=PARAMS[name])))
    assert want != mlflow_answer(model, json.dumps({"dataframe_split": split(frame)}))[1]


@pytest.mark.parametrize("name", MODELS)
def test_csv_answers_the_models_prediction(flavors: Flavors, ferry: Server, name: str) -> None:
    model, frame = flavors.models[name], flavors.frames[name]
    text = frame.to_csv(index=False)
    status, want = mlflow_answer(model, text, "text/csv")
    if name == "churn-code":
        # MLflow 3.17 cannot read a datetime column from CSV (pandas refuses dtype datetime64 in
        # read_csv: "pass this column using parse_dates instead"), so MLflow answers 400; Ferry answers
        # what the model predicts for the table, as MLflow answers it in JSON.
        assert (status, want) == (400, "BAD_REQUEST")
        status, want = 200, {"predictions": _mlflow_jsonable(model.predict(frame))}
    assert status == 200, want
    r = invocations(ferry, name, text, "text/csv")
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)


@pytest.mark.parametrize("name", MODELS)
def test_serving_input_example_is_answered_like_mlflow(flavors: Flavors, ferry: Server, name: str) -> None:
    import mlflow

    path = Path(
        mlflow.artifacts.download_artifacts(flavors.uri(name), tracking_uri=flavors.registry.tracking_uri)
    )
    example = (path / "serving_input_example.json").read_text()
    status, want = mlflow_answer(flavors.models[name], example)
    assert status == 200, want
    r = invocations(ferry, name, example)
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)


# -------------------------------------------------------------------------------------------------- /predict
@pytest.mark.parametrize("shape", ["records", "columns"])
@pytest.mark.parametrize("name", MODELS)
def test_predict_answers_the_models_prediction(
    flavors: Flavors, ferry: Server, name: str, shape: str
) -> None:
    model, frame = flavors.models[name], flavors.frames[name]
    inputs = records(frame) if shape == "records" else columns(frame)
    r = predict(ferry, name, inputs)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["model"], answer["version"]) == (name, "1")
    assert_same(answer["outputs"], outputs_of(model.predict(frame)))
    if name in PARAMS:
        r = predict(ferry, name, inputs, PARAMS[name])
        assert r.status_code == 200, r.text
        assert_same(r.json()["outputs"], outputs_of(model.predict(frame, params=PARAMS[name])))


def test_rows_batched_together_get_their_own_answers(flavors: Flavors, ferry: Server) -> None:
    """Concurrent one-row requests (batched by rows into one DataFrame) each get their own row's answer."""
    frame = tabular.churn_frame(48, seed=5)[0][list(tabular.COLUMNS)]
    rows = records(frame)
    for name in ("churn-sklearn-proba", "churn-pyfunc"):
        model = flavors.models[name]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda row, n=name: predict(ferry, n, [row]), rows))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        for i, answer in enumerate(answers):
            assert_same(
                answer.json()["outputs"], outputs_of(model.predict(frame.iloc[[i]].reset_index(drop=True)))
            )


# ------------------------------------------------------------------------------------------------------- v2
@pytest.mark.parametrize("name", MODELS)
def test_v2_takes_one_input_per_column(flavors: Flavors, ferry: Server, name: str) -> None:
    model, frame = flavors.models[name], flavors.frames[name]
    body: dict[str, Any] = {"inputs": v2_inputs(model, frame)}
    r = httpx.post(f"{ferry.url}/v2/models/{name}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["model_name"], answer["model_version"]) == (name, "1")
    want = model.predict(frame)
    outputs = {o["name"]: o for o in answer["outputs"]}
    if isinstance(want, pd.DataFrame):
        assert list(outputs) == list(want.columns)
        for column in want.columns:
            assert outputs[column]["shape"] == [len(frame)]
            assert_same(outputs[column]["data"], want[column].tolist(), column)
        assert outputs["action"]["datatype"] == "BYTES" and outputs["will_churn"]["datatype"] == "BOOL"
    else:
        [output] = outputs.values()
        values = np.asarray(want)
        assert output["shape"] == list(values.shape)
        assert_same(output["data"], values.ravel().tolist())


# ---------------------------------------------------------------------------------------------- mlflow serve
def test_mlflow_models_serve_answers_the_same(flavors: Flavors, servers: dict[str, Server]) -> None:
    """The real ``mlflow models serve`` on ``churn-sklearn``: Ferry's answer to each form and to CSV is
    the same JSON, and each bad request gets the same status and error code."""
    frame = flavors.frames["churn-sklearn"]
    bodies = [(json.dumps(b), "application/json") for b in form_bodies(frame).values()]
    bodies.append((frame.to_csv(index=False), "text/csv"))
    for body, content_type in bodies:
        theirs = httpx.post(
            f"{servers['mlflow'].url}/invocations",
            content=body.encode(),
            headers={"Content-Type": content_type},
            timeout=60,
        )
        ours = invocations(servers["ferry"], "churn-sklearn", body, content_type)
        assert theirs.status_code == ours.status_code == 200, (body, theirs.text, ours.text)
        assert_same(ours.json(), theirs.json(), body[:40])
    for case, (column, bad) in bad_bodies("churn-sklearn", frame).items():
        theirs = httpx.post(f"{servers['mlflow'].url}/invocations", json=bad, timeout=60)
        ours = invocations(servers["ferry"], "churn-sklearn", bad)
        assert theirs.status_code == 400, (case, theirs.text)
        assert ours.status_code == theirs.status_code, (case, ours.text, theirs.text)
        assert ours.json()["error_code"] == theirs.json()["error_code"], (case, ours.text, theirs.text)
        assert column in ours.json()["message"], (case, ours.text)


# ----------------------------------------------------------------------------------------------- bad input
def bad_bodies(name: str, frame: pd.DataFrame) -> dict[str, tuple[str, dict[str, Any]]]:
    """Bad ``/invocations`` bodies for ``name``, by case: (the column at fault, the body)."""
    numeric = "monthly_charges"
    required = "tenure_months"
    rows = records(frame)
    missing_split = split(frame.drop(columns=[numeric]))
    string_in_number = [dict(r) for r in rows]
    string_in_number[1][numeric] = "abc"
    null_number = [dict(r) for r in rows]
    null_number[1][numeric] = None
    null_long = [dict(r) for r in rows]
    null_long[1][required] = None
    key_left_out = [dict(r) for r in rows]
    del key_left_out[1][numeric]
    return {
        "missing column": (numeric, {"dataframe_split": missing_split}),
        "string in a double column": (numeric, {"dataframe_records": string_in_number}),
        "null in a double column": (numeric, {"dataframe_records": null_number}),
        "null in a long column": (required, {"dataframe_records": null_long}),
        "a record without a required column": (numeric, {"dataframe_records": key_left_out}),
    }


BAD_CASES = list(bad_bodies("churn-sklearn", unseen_rows("churn-sklearn")))


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("name", MODELS)
def test_bad_input_on_invocations_gets_mlflows_status_and_code(
    flavors: Flavors, ferry: Server, name: str, case: str
) -> None:
    """Where MLflow refuses the body, Ferry answers its status and error code; where MLflow lets a null
    through to the model (a double column, a record that leaves a column out), Ferry refuses it with
    MLflow's 400 too, naming the column: the signature says the column is required."""
    column, body = bad_bodies(name, flavors.frames[name])[case]
    status, want = mlflow_answer(flavors.models[name], json.dumps(body))
    r = invocations(ferry, name, body)
    error = r.json()
    assert set(error) >= {"error_code", "message"}, error
    assert column in error["message"], error
    if status == 200:
        assert r.status_code == 400 and error["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE"), (
            error
        )
    else:
        assert (r.status_code, error["error_code"]) == (status, want), error


PREDICT_BAD = [
    "missing column",
    "string in a double column",
    "null in a double column",
    "null in a long column",
]


@pytest.mark.parametrize("case", PREDICT_BAD)
@pytest.mark.parametrize("shape", ["records", "columns"])
@pytest.mark.parametrize("name", MODELS)
def test_bad_input_on_predict_is_a_422_naming_the_column(
    flavors: Flavors, ferry: Server, name: str, shape: str, case: str
) -> None:
    frame = flavors.frames[name]
    table = columns(frame)
    column = "tenure_months" if case == "null in a long column" else "monthly_charges"
    if case == "missing column":
        del table[column]
    else:
        table[column][1] = "abc" if case.startswith("string") else None
    inputs: Any = table
    if shape == "records":
        inputs = [{c: table[c][i] for c in table} for i in range(len(frame))]
    r = predict(ferry, name, inputs)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    code = "invalid_input" if case == "missing column" else "invalid_value"  # a cell: MLflow's BAD_REQUEST
    assert error["code"] == code and column in error["message"], error
    named = [
        v for value in error["details"].values() for v in (value if isinstance(value, list) else [value])
    ]
    assert column in named, error


def test_a_wrong_params_value_is_a_422_naming_params(flavors: Flavors, ferry: Server) -> None:
    frame = flavors.frames["churn-pyfunc"]
    r = predict(ferry, "churn-pyfunc", records(frame), {"threshold": "high"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == "params" and "threshold" in r.json()["error"]["message"]
    body = {"dataframe_split": split(frame), "params": {"threshold": "high"}}
    status, code = mlflow_answer(flavors.models["churn-pyfunc"], json.dumps(body))
    r = invocations(ferry, "churn-pyfunc", body)
    assert (r.status_code, r.json()["error_code"]) == (status, code) == (400, "INVALID_PARAMETER_VALUE")


def test_v2_bad_column_is_a_400_naming_it(flavors: Flavors, ferry: Server) -> None:
    model, frame = flavors.models["churn-sklearn"], flavors.frames["churn-sklearn"]
    inputs = [i for i in v2_inputs(model, frame) if i["name"] != "contract"]
    r = httpx.post(f"{ferry.url}/v2/models/churn-sklearn/infer", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 400 and "contract" in r.json()["error"], r.text
    inputs = v2_inputs(model, frame)
    inputs[1] = {**inputs[1], "datatype": "BYTES", "data": ["abc"] * len(frame)}  # monthly_charges
    r = httpx.post(f"{ferry.url}/v2/models/churn-sklearn/infer", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 400 and "monthly_charges" in r.json()["error"], r.text


# ----------------------------------------------------------------------------------------------------- pickle
def test_pickle_is_refused_unless_allowed(
    flavors: Flavors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ferry's default: MLflow refuses skops and cloudpickle (skops takes its trusted types from the
    model's own files), and the refusal names the variable that allows it; models from code and a
    LightGBM Booster (its text format) load without it."""
    from service.config import Settings
    from service.errors import FerryError
    from service.registry import ModelRegistry

    # Unset, so that Ferry's default applies; set then deleted, so that monkeypatch restores the
    # variable as it was (the registry sets it in this process).
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    monkeypatch.setenv("FERRY_ALLOWED_FLAVORS", FLAVORS)
    registry = ModelRegistry(
        Settings(tracking_uri=flavors.registry.tracking_uri, download_dir=str(tmp_path), device="cpu")
    )
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    for name in NAMES:
        ref = registry.resolve(f"models:/{name}@champion")
        if name in tabular.NEEDS_PICKLE:
            with pytest.raises(FerryError, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
                registry.load(name, ref)
        else:
            loaded = registry.load(name, ref)
            assert [s.name for s in loaded.inputs] == list(flavors.frames[name].columns)
            loaded.runtime.close()


def test_how_the_models_are_stored(flavors: Flavors) -> None:
    """What the logging produced: skops for scikit-learn (MLflow 3's default), a cloudpickled
    ``PythonModel``, the code file of the models-from-code model, LightGBM's own format."""
    import mlflow

    files = {
        name: {
            p.name
            for p in Path(
                mlflow.artifacts.download_artifacts(
                    flavors.uri(name), tracking_uri=flavors.registry.tracking_uri
                )
            ).iterdir()
        }
        for name in NAMES
    }
    assert "model.skops" in files["churn-sklearn"] and "model.pkl" not in files["churn-sklearn"]
    assert "python_model.pkl" in files["churn-pyfunc"]
    assert "code_model.py" in files["churn-code"] and not any(f.endswith(".pkl") for f in files["churn-code"])
    if HAS_LIGHTGBM:
        assert "model.lgb" in files["churn-lightgbm"]
    sklearn_conf = flavors.models["churn-sklearn"].metadata.flavors["sklearn"]
    assert sklearn_conf["serialization_format"] == "skops"
