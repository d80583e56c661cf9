"""Tabular models trained on a pandas DataFrame and logged to MLflow the way a data scientist logs them,
for the flavor tests (``tests/integration/test_flavors.py``) and the benchmark's ``churn-sklearn``.

The data: ``churn_frame`` makes synthetic telecom customers, one row each, with the columns
``tenure_months`` (int64), ``monthly_charges`` (float64), ``total_charges`` (float64),
``support_calls`` (int64), ``contract`` (string: month-to-month, one-year, two-year) and ``paperless``
(bool), and whether each customer churned.

The models (each ``log_*`` logs one into the active run of the current tracking URI and returns MLflow's
``ModelInfo``; ``register`` gives it a registered name and the alias ``champion``):

- ``churn-sklearn``: ``Pipeline(ColumnTransformer(StandardScaler on the numbers and the bool,
  OneHotEncoder(handle_unknown="ignore") on contract), LogisticRegression)``, logged with
  ``mlflow.sklearn.log_model`` and its default serialization, which in MLflow 3 is skops
  (``model.skops``) outside Databricks. It answers 0 or 1 per row; ``churn-sklearn-proba`` is the same
  pipeline logged with ``pyfunc_predict_fn="predict_proba"`` (two columns per row).
- ``churn-pyfunc``: a ``PythonModel`` subclass over DataFrames (``ChurnRisk``) taking the params
  ``threshold`` and ``offer``, returning a DataFrame with the columns ``churn_probability``,
  ``will_churn`` and ``action``; logged as an object, which MLflow stores with cloudpickle.
- ``churn-code``: a models-from-code pyfunc (``models/code_model.py``): a customer's expected revenue
  over ``horizon_months`` (a param) from ``tenure_months``, ``monthly_charges``, ``contract`` and the
  datetime column ``signup_date``.
- ``churn-lightgbm``: a LightGBM ``Booster`` (``lightgbm.train``) on the numeric and bool columns,
  logged with ``mlflow.lightgbm.log_model``; MLflow stores a Booster in LightGBM's own text format
  (``model.lgb``). LightGBM is a test-only dependency (the ``dev`` extra).

Loading: MLflow (3.17) refuses to load any scikit-learn model, skops included, and any cloudpickled
``PythonModel`` unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true (MLflow's own default is true;
Ferry's is false, see ``service/registry.py``): skops reads its list of trusted types from the model's
own files. ``churn-sklearn``, ``churn-sklearn-proba`` and ``churn-pyfunc`` need it; ``churn-code`` and
``churn-lightgbm`` load without it.

``python models/tabular.py [NAME ...]`` registers the named models (default: ``churn-sklearn``) in
``MLFLOW_TRACKING_URI`` with the alias ``champion``, unless the champion was built from this same code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo

HERE = Path(__file__).resolve()
CODE_MODEL = HERE.with_name("code_model.py")
ALIAS = "champion"
EXPERIMENT = "ferry-tabular"
CONTRACTS = ("month-to-month", "one-year", "two-year")
NUMERIC = ("tenure_months", "monthly_charges", "total_charges", "support_calls")
COLUMNS = (*NUMERIC, "contract", "paperless")
"""The churn models' input columns, in the order of their signatures."""
BOOSTER_COLUMNS = (*NUMERIC, "paperless")
"""The LightGBM model's input columns."""
CODE_COLUMNS = ("tenure_months", "monthly_charges", "contract", "signup_date")
"""The models-from-code model's input columns."""
REFERENCE_DATE = pd.Timestamp("2025-06-30")
"""The day the synthetic data was taken: signup dates lie before it (``code_model.py`` counts from it)."""
log = logging.getLogger("ferry.tabular")


# ------------------------------------------------------------------------------------------------------- data
def churn_frame(rows: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """``rows`` synthetic customers (the columns of ``COLUMNS``) and whether each churned (int64 0/1).

    Churn is likelier on a month-to-month contract, with more support calls, higher charges and a short
    tenure; a logistic model of those, sampled, so no model scores it perfectly."""
    rng = np.random.default_rng(seed)
    contract = rng.choice(np.array(CONTRACTS, dtype=object), rows, p=[0.55, 0.25, 0.20])
    tenure = rng.integers(0, 73, rows).astype(np.int64)
    monthly = rng.uniform(18.0, 120.0, rows).round(2)
    frame = pd.DataFrame(
        {
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": (tenure * monthly * rng.uniform(0.9, 1.1, rows)).round(2),
            "support_calls": rng.poisson(1.5, rows).astype(np.int64),
            "contract": pd.Series(contract, dtype=object),
            "paperless": rng.random(rows) < 0.6,
        }
    )
    logit = (
        -1.2
        + 1.6 * (frame["contract"] == "month-to-month")
        - 0.8 * (frame["contract"] == "two-year")
        - 0.045 * frame["tenure_months"]
        + 0.018 * frame["monthly_charges"]
        + 0.4 * frame["support_calls"]
        + 0.3 * frame["paperless"]
    )
    churned = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit.to_numpy(dtype=np.float64)))
    return frame, pd.Series(churned.astype(np.int64), name="churned")


def signup_dates(frame: pd.DataFrame) -> pd.Series:
    """Each customer's signup date: ``tenure_months`` before ``REFERENCE_DATE`` (datetime64[ns])."""
    days = (frame["tenure_months"].to_numpy() * 30.44).round().astype("timedelta64[D]")
    return pd.Series(
        (np.datetime64(REFERENCE_DATE, "ns") - days).astype("datetime64[ns]"), name="signup_date"
    )


def code_frame(rows: int = 200, seed: int = 0) -> pd.DataFrame:
    """The models-from-code model's input: ``CODE_COLUMNS`` of ``rows`` customers."""
    frame, _ = churn_frame(rows, seed)
    return frame.assign(signup_date=signup_dates(frame))[list(CODE_COLUMNS)]


# ---------------------------------------------------------------------------------------------- scikit-learn
def churn_pipeline() -> Any:
    """The unfitted scikit-learn pipeline of ``churn-sklearn``."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features = ColumnTransformer(
        [
            ("numeric", StandardScaler(), [*NUMERIC, "paperless"]),
            ("contract", OneHotEncoder(handle_unknown="ignore"), ["contract"]),
        ]
    )
    return Pipeline([("features", features), ("classifier", LogisticRegression(max_iter=500))])


def train_churn_sklearn(rows: int = 2000, seed: int = 0) -> tuple[Any, pd.DataFrame]:
    """The fitted pipeline and the frame it was fitted on."""
    x, y = churn_frame(rows, seed)
    return churn_pipeline().fit(x, y), x


def log_churn_sklearn(
    proba: bool = False, rows: int = 2000, seed: int = 0, name: str = "model", model: Any = None
) -> ModelInfo:
    """Fit the pipeline (or take the fitted ``model``) and log it with ``mlflow.sklearn.log_model``:
    the signature inferred from the training frame and the model's answers on it, the first three rows
    as the input example, MLflow's default serialization (skops). ``proba``: ``predict_proba`` serves."""
    import mlflow.sklearn

    x = churn_frame(rows, seed)[0]
    if model is None:
        model, x = train_churn_sklearn(rows, seed)
    output = model.predict_proba(x) if proba else model.predict(x)
    return mlflow.sklearn.log_model(
        model,
        name=name,
        signature=infer_signature(x, output),
        input_example=x.head(3),
        pyfunc_predict_fn="predict_proba" if proba else "predict",
        pip_requirements=_requirements("scikit-learn", "skops", "pandas"),
    )


# ---------------------------------------------------------------------------------- custom PythonModel
class ChurnRisk(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """A hand-written churn score with a business rule on top: ``churn_probability`` from a logistic
    model fitted elsewhere (its coefficients are attributes), ``will_churn`` where it reaches the param
    ``threshold`` (default 0.5), and ``action``: the param ``offer`` (default ``"discount"``) for those
    customers, ``"none"`` for the others."""

    def __init__(self, intercept: float, weights: dict[str, float], contract_weights: dict[str, float]):
        self.intercept = intercept
        self.weights = weights
        self.contract_weights = contract_weights

    # No type hints on predict: MLflow would read them as an input schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        params = params or {}
        threshold = float(params.get("threshold", 0.5))
        offer = str(params.get("offer", "discount"))
        logit = np.full(len(model_input), self.intercept, dtype=np.float64)
        for column, weight in self.weights.items():
            logit += weight * model_input[column].to_numpy(dtype=np.float64)
        contract = model_input["contract"].astype(object)
        logit += contract.map(self.contract_weights).fillna(0.0).to_numpy(dtype=np.float64)
        probability = 1.0 / (1.0 + np.exp(-logit))
        will_churn = probability >= threshold
        return pd.DataFrame(
            {
                "churn_probability": probability,
                "will_churn": will_churn,
                "action": np.where(will_churn, offer, "none").astype(object),
            }
        )


def train_churn_risk(rows: int = 2000, seed: int = 0) -> tuple[ChurnRisk, pd.DataFrame]:
    """A ``ChurnRisk`` with coefficients fitted on ``churn_frame`` (a plain logistic regression on the raw
    columns and the contract), and that frame."""
    from sklearn.linear_model import LogisticRegression

    x, y = churn_frame(rows, seed)
    design = pd.concat(
        [x[[*NUMERIC, "paperless"]].astype(np.float64), pd.get_dummies(x["contract"], dtype=np.float64)],
        axis=1,
    )
    fitted = LogisticRegression(max_iter=2000).fit(design.to_numpy(), y.to_numpy())
    coef = dict(zip(design.columns, fitted.coef_[0].tolist(), strict=True))
    model = ChurnRisk(
        intercept=float(fitted.intercept_[0]),
        weights={c: coef[c] for c in (*NUMERIC, "paperless")},
        contract_weights={c: coef[c] for c in CONTRACTS},
    )
    return model, x


RISK_PARAMS = {"threshold": 0.5, "offer": "discount"}
"""``churn-pyfunc``'s params and their defaults (its signature's params schema)."""


def log_churn_pyfunc(rows: int = 2000, seed: int = 0, name: str = "model") -> ModelInfo:
    """Log a fitted ``ChurnRisk`` object with ``mlflow.pyfunc.log_model(python_model=...)``: MLflow
    cloudpickles it; this file goes along as its code (``code_paths``), so that the class imports where
    the model is loaded."""
    model, x = train_churn_risk(rows, seed)
    output = model.predict(None, x)  # type: ignore[no-untyped-call]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=model,
        code_paths=[str(HERE)],
        signature=infer_signature(x, output, params=RISK_PARAMS),
        input_example=x.head(3),
        pip_requirements=_requirements("pandas", "scikit-learn"),
    )


# ---------------------------------------------------------------------------------------- models from code
CODE_PARAMS = {"horizon_months": 12}
"""``churn-code``'s params and their defaults."""


def log_churn_code(rows: int = 200, seed: int = 0, name: str = "model") -> ModelInfo:
    """Log ``models/code_model.py`` as a models-from-code pyfunc (the file's path as ``python_model``):
    MLflow stores the source file and runs it at load time, nothing is pickled."""
    x = code_frame(rows, seed)
    output = _code_model().predict(None, x)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(CODE_MODEL),
        signature=infer_signature(x, output, params=CODE_PARAMS),
        input_example=x.head(3),
        pip_requirements=_requirements("pandas"),
    )


def _code_model() -> Any:
    """The model object ``code_model.py`` sets, built by running the file as MLflow does."""
    import runpy

    return runpy.run_path(str(CODE_MODEL))["MODEL"]


# ------------------------------------------------------------------------------------------------- LightGBM
def train_churn_lightgbm(rows: int = 2000, seed: int = 0) -> tuple[Any, pd.DataFrame]:
    """A LightGBM ``Booster`` (binary objective: it predicts the churn probability) on ``BOOSTER_COLUMNS``,
    and the frame it was trained on."""
    import lightgbm as lgb

    x, y = churn_frame(rows, seed)
    x = x[list(BOOSTER_COLUMNS)]
    params = {
        "objective": "binary",
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "num_threads": 1,
        "deterministic": True,
        "verbosity": -1,
        "seed": seed,
    }
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=40)
    return booster, x


def log_churn_lightgbm(rows: int = 2000, seed: int = 0, name: str = "model") -> ModelInfo:
    """Train and log the Booster with ``mlflow.lightgbm.log_model`` (LightGBM's text format)."""
    import mlflow.lightgbm

    booster, x = train_churn_lightgbm(rows, seed)
    return mlflow.lightgbm.log_model(
        booster,
        name=name,
        signature=infer_signature(x, booster.predict(x)),
        input_example=x.head(3),
        pip_requirements=_requirements("lightgbm", "pandas"),
    )


# ---------------------------------------------------------------------------------------------- registering
LOGGERS: dict[str, Callable[[], ModelInfo]] = {
    "churn-sklearn": log_churn_sklearn,
    "churn-sklearn-proba": lambda: log_churn_sklearn(proba=True),
    "churn-pyfunc": log_churn_pyfunc,
    "churn-code": log_churn_code,
    "churn-lightgbm": log_churn_lightgbm,
}
"""Every model of this module by its registered name."""
NEEDS_PICKLE = frozenset({"churn-sklearn", "churn-sklearn-proba", "churn-pyfunc"})
"""The models MLflow loads only with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``."""


def register(
    name: str, info: ModelInfo, alias: str | None = ALIAS, tags: dict[str, str] | None = None
) -> str:
    """Register the logged model as a new version of ``name`` (with ``alias``); the version number."""
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(info.model_uri, name, tags=tags)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def log_and_register(name: str, alias: str | None = ALIAS, tags: dict[str, str] | None = None) -> str:
    """Train ``name`` (a key of ``LOGGERS``), log it in a run of its own and register it."""
    with mlflow.start_run(run_name=name):
        return register(name, LOGGERS[name](), alias, tags)


def fingerprint(name: str) -> str:
    """This code and the libraries that shape the model: a champion with the same one is up to date."""
    import sklearn

    digest = hashlib.sha256(f"{name}|mlflow {mlflow.__version__}|sklearn {sklearn.__version__}".encode())
    for source in (HERE, CODE_MODEL):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _requirements(*packages: str) -> list[str]:
    """Pinned requirements of the installed ``packages`` and mlflow (MLflow would otherwise infer them by
    loading the model in a subprocess, which takes seconds)."""
    import importlib.metadata

    return [f"{p}=={importlib.metadata.version(p)}" for p in ("mlflow", *packages)]


def main(names: list[str]) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///.ferry/mlflow.db")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        local = not uri.startswith(("http:", "https:", "databricks"))
        location = Path(os.environ.get("FERRY_ARTIFACTS_DIR", ".ferry/artifacts")).resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=location if local else None)
    mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient()
    for name in names or ["churn-sklearn"]:
        fp = fingerprint(name)
        try:
            champion = client.get_model_version_by_alias(name, ALIAS)
        except MlflowException:
            champion = None
        if champion is not None and champion.tags.get("ferry.fingerprint") == fp:
            log.info("%s@%s is up to date (fingerprint %s)", name, ALIAS, fp)
            continue
        started = time.perf_counter()
        version = log_and_register(name, tags={"ferry.fingerprint": fp})
        log.info(
            "registered %s version %s as @%s in %.1fs", name, version, ALIAS, time.perf_counter() - started
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
