"""MLflow scoring protocol (``mlflow models serve``'s ``/invocations``) wire models.

They document the API; the route parses bodies with orjson and numpy instead (pandas costs
milliseconds per row).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class DataFrameSplit(BaseModel):
    columns: list[Any] | None = Field(default=None, examples=[["a", "b", "c", "d"]])
    data: list[list[Any]] = Field(examples=[[[1.0, 2.0, 3.0, 4.0]]])
    index: list[Any] | None = None


class InvocationsRequest(BaseModel):
    """Exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``."""

    dataframe_split: DataFrameSplit | None = Field(
        default=None, description="pandas.DataFrame.to_dict(orient='split')."
    )
    dataframe_records: list[dict[str, Any]] | None = Field(
        default=None, description="pandas.DataFrame.to_dict(orient='records')."
    )
    instances: list[Any] | dict[str, Any] | None = Field(
        default=None, description="TF-serving rows: values, or {input_name: value} per row."
    )
    inputs: list[Any] | dict[str, Any] | None = Field(
        default=None,
        description="TF-serving columns: a nested list, or {input_name: nested list}.",
        examples=[[[1.0, 2.0, 3.0, 4.0]]],
    )
    params: dict[str, Any] | None = Field(default=None, description="Model parameters.")


class InvocationsResponse(BaseModel):
    predictions: Any = Field(
        description="A nested list for a single-output model; {output_name: nested list} for ONNX models "
        "and models with several outputs, as mlflow models serve answers.",
        examples=[[[21.0, 21.0, 21.0]]],
    )


class ErrorResponse(BaseModel):
    error_code: str = Field(examples=["INVALID_PARAMETER_VALUE"])
    message: str
