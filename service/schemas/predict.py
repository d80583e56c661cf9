"""Ferry's own protocol: ``POST /predict``.

These models document the API (OpenAPI at ``/docs``); the hot path parses bodies with orjson and
validates tensors against the model's signature instead, which is several times cheaper.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Tensor = list[Any]


class PredictRequest(BaseModel):
    model: str | None = Field(
        default=None,
        description="Model to use; may be left out when one model is served.",
        examples=["fraud"],
    )
    inputs: Tensor | dict[str, Tensor] = Field(
        description="Rows: a nested list for a single-input model, or {input_name: nested list}.",
        examples=[[[0.1, 0.2, 0.3]]],
    )
    params: dict[str, Any] | None = Field(
        default=None, description="Model parameters; part of the cache key, passed to pyfunc models."
    )


class PredictResponse(BaseModel):
    model: str = Field(description="Model that answered.")
    version: str = Field(description="Model version that computed the outputs.")
    outputs: Tensor | dict[str, Tensor] = Field(
        description="One row per input row: a nested list for a single-output model, or {output_name: rows}."
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_input.")
    message: str = Field(description="What was wrong, naming the field or input.")
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelState(BaseModel):
    status: str
    models: dict[str, str]
