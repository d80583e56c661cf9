"""Ferry's domain exceptions.

One tree; each class carries the HTTP status it maps to and a stable machine-readable ``code``.
Every protocol's error handler renders these in its own body shape.

FerryError
├── BadRequest            400 bad_request          body is not JSON / not the expected structure
├── Unauthorized          401 unauthorized         missing or invalid API key / admin token
├── UnsupportedMediaType  415 unsupported_media_type  a content type the protocol does not take
├── InvalidInput          422 invalid_input        inputs do not match the model's signature
├── ModelNotFound         404 model_not_found      no such model (or version) is served
├── PayloadTooLarge       413 payload_too_large    body or row count above the configured limits
├── RequestTimeout        408 request_timeout      the body did not arrive in time (connection closed)
├── NotReady              503 not_ready            the model is loading or shutting down
├── RegistryUnavailable   503 registry_unavailable  MLflow did not answer (the loaded versions keep serving)
├── Overloaded            503 overloaded           the model's queue is full, or too many requests in flight
                                                   (Retry-After)
├── OverBudget            503 over_budget          a model to load does not fit the memory budget beside the
                                                   models that cannot be unloaded now (Retry-After)
├── DeadlineExceeded      504 deadline_exceeded    the request's deadline passed
├── ClientGone            499 client_closed_request  the client hung up before its rows reached the model
├── ModelLoadError        500 model_load_failed    a model version could not be loaded or warmed up
├── ConfigurationError    500 configuration_error  start-up settings that cannot work (e.g. CUDA absent)
└── InferenceFailed       500 inference_failed     the model raised while computing a batch
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar


class FerryError(Exception):
    """Base of every error Ferry raises on purpose."""

    status: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(FerryError):
    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"


class Unauthorized(FerryError):
    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class UnsupportedMediaType(FerryError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class InvalidInput(FerryError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_input"


class InvalidValue(InvalidInput):
    """A value in a table's column that its type does not take (a string for a number, a null where
    the column is required): MLflow's scoring server says ``BAD_REQUEST`` for these, where a missing
    column is ``INVALID_PARAMETER_VALUE``."""

    code = "invalid_value"


class ModelRejected(InvalidInput):
    """The model itself refused a request's input (a pyfunc model raised on it, run alone): the
    client's error, answered 422 with the model's message, as ``mlflow models serve`` answers 400."""

    code = "model_rejected"


class ModelNotFound(FerryError):
    status = HTTPStatus.NOT_FOUND
    code = "model_not_found"


class PayloadTooLarge(FerryError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class RequestTimeout(FerryError):
    """The request's body did not arrive within ``FERRY_LIMITS__BODY_TIMEOUT_S``; the connection is closed
    after the answer (the rest of the body will not be read)."""

    status = HTTPStatus.REQUEST_TIMEOUT
    code = "request_timeout"


class NotReady(FerryError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"
    retry_after_s: int = 5


class RegistryUnavailable(FerryError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "registry_unavailable"
    retry_after_s: int = 10


class Overloaded(FerryError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "overloaded"
    retry_after_s: int = 1


class OverBudget(FerryError):
    """Loading a model would exceed ``FERRY_MEMORY__BUDGET_BYTES`` even after unloading every idle model;
    the message gives the sizes. Retried later it may fit (busy models become idle)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "over_budget"
    retry_after_s: int = 1


class DeadlineExceeded(FerryError):
    status = HTTPStatus.GATEWAY_TIMEOUT
    code = "deadline_exceeded"


class ClientGone(FerryError):
    """Nobody reads the answer: the model never ran these rows. 499 as nginx logs it; the client never
    sees it; ``http_requests_total{status="499"}`` and ``ferry_requests_rejected_total`` count it."""

    status = 499
    code = "client_closed_request"


class ModelLoadError(FerryError):
    code = "model_load_failed"


class ConfigurationError(FerryError):
    code = "configuration_error"


class InferenceFailed(FerryError):
    code = "inference_failed"
