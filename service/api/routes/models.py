"""``GET /models`` and ``GET /models/{name}``: what is served, in which version, on which device."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import Service

router = APIRouter(tags=["models"])


@router.get("/models", summary="Served models")
async def list_models(service: Service) -> dict[str, Any]:
    return {"models": [service.describe(slot) for slot in service.slots()], "default": service.default_model}


@router.get("/models/{name}", summary="One served model")
async def get_model(name: str, service: Service) -> dict[str, Any]:
    return service.describe(service.find(name))
