"""The admin API, mounted only when ``FERRY_ADMIN_TOKEN`` is set (404 otherwise), behind that bearer
token: list, load (or re-point) a model, force a reload, unload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.api.auth import KeyRing
from service.api.deps import Models
from service.api.protocols.ferry import describe
from service.config import BatchSettings, Settings


async def require_admin(request: Request) -> None:
    ring: KeyRing = request.app.state.admin_keys
    ring.check(request)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class LoadModel(BaseModel):
    uri: Annotated[
        str,
        Field(
            description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH, an MLflow model directory "
            "(absolute path or file://) or an artifact URI (s3://, gs://, https://, mlflow-artifacts:/)"
        ),
    ]


@router.get("/models", summary="Every model, in any state")
async def list_models(request: Request, models: Models) -> dict[str, Any]:
    return {"models": [describe(slot, _batch(request)) for slot in models.slots()]}


@router.put("/models/{name}", summary="Serve a model from a URI (a new one, or a new URI for one served)")
async def load_model(request: Request, name: str, body: LoadModel, models: Models) -> dict[str, Any]:
    return describe(await models.add(name, body.uri), _batch(request))


@router.post("/models/{name}/reload", summary="Resolve the model's URI again and swap in its version")
async def reload_model(request: Request, name: str, models: Models) -> dict[str, Any]:
    models.find(name)
    return describe(await models.load(name, reason="admin"), _batch(request))


@router.delete("/models/{name}", status_code=204, summary="Stop serving a model")
async def unload_model(name: str, models: Models) -> Response:
    await models.remove(name)
    return Response(status_code=204)


def _batch(request: Request) -> BatchSettings:
    settings: Settings = request.app.state.settings
    return settings.batch
