"""``churn-code``, a models-from-code pyfunc (``models/tabular.py`` logs this file as ``python_model``):
each customer's expected revenue over the next ``horizon_months`` (a param, default 12).

Input: a DataFrame with ``tenure_months`` (int64), ``monthly_charges`` (float64), ``contract`` (string)
and ``signup_date`` (datetime64). Output: a float64 Series ``expected_revenue``, one value per row:
the monthly charge times the months the customer is expected to stay within the horizon, given a monthly
retention rate by contract that improves with the customer's age (from ``signup_date``) and tenure.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

RETENTION = {"month-to-month": 0.93, "one-year": 0.97, "two-year": 0.985}
UNKNOWN_CONTRACT = 0.9
REFERENCE_DATE = np.datetime64("2025-06-30", "ns")


class ExpectedRevenue(PythonModel):  # type: ignore[misc]
    # No type hints: MLflow would take them for an input schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        horizon = int((params or {}).get("horizon_months", 12))
        contract = model_input["contract"].astype(object).map(RETENTION).fillna(UNKNOWN_CONTRACT)
        signup = pd.to_datetime(model_input["signup_date"]).to_numpy(dtype="datetime64[ns]")
        age_years = (REFERENCE_DATE - signup) / np.timedelta64(365, "D")
        loyalty = np.minimum(0.01 * age_years + 0.0005 * model_input["tenure_months"].to_numpy(), 0.04)
        retention = np.minimum(contract.to_numpy(dtype=np.float64) + loyalty, 0.999)
        months = np.arange(1, horizon + 1, dtype=np.float64)
        expected_months = (retention[:, None] ** months[None, :]).sum(axis=1)
        revenue = model_input["monthly_charges"].to_numpy(dtype=np.float64) * expected_months
        return pd.Series(revenue, name="expected_revenue", index=model_input.index)


MODEL = ExpectedRevenue()
mlflow.models.set_model(MODEL)
