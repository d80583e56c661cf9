"""The admin API, mounted only when ``FERRY_ADMIN_TOKEN`` is set (404 otherwise), behind that bearer
token: list, load (or re-point) a model, force a reload, unload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.api.auth import KeyRing
from service.api.deps import Service


async def require_admin(request: Request) -> None:
    ring: KeyRing = request.app.state.admin_keys
    ring.check(request)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class LoadModel(BaseModel):
    uri: Annotated[str, Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH")]


@router.get("/models", summary="Every model, in any state")
async def list_models(service: Service) -> dict[str, Any]:
    return {"models": [service.describe(slot) for slot in service.slots()]}


@router.put("/models/{name}", summary="Serve a model from a URI (a new one, or a new URI for one served)")
async def load_model(name: str, body: LoadModel, service: Service) -> dict[str, Any]:
    return service.describe(await service.add(name, body.uri))


@router.post("/models/{name}/reload", summary="Resolve the model's URI again and swap in its version")
async def reload_model(name: str, service: Service) -> dict[str, Any]:
    service.find(name)
    return service.describe(await service.load(name))


@router.delete("/models/{name}", status_code=204, summary="Stop serving a model")
async def unload_model(name: str, service: Service) -> Response:
    await service.remove(name)
    return Response(status_code=204)
