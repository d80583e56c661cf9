"""``GET /docs``: Swagger UI served from the installed package ``swagger-ui-bundle-v2`` (Swagger UI's
own dist files, Apache-2.0, its licence shipped with it), never from a CDN, so that the page works in
an air-gapped cluster. ``/redoc`` is off: no ReDoc build ships as a Python package we want to depend
on. The page and its assets stay outside the API keys, like the OpenAPI document they render."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"
FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
"""The only files of the bundle served: the page needs these three and nothing else."""


def install(app: FastAPI) -> None:
    """Add ``/docs`` and its assets to ``app``, built with ``docs_url=None`` and ``redoc_url=None``."""
    folder = Path(str(swagger_ui_path))
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(ASSETS + "/{file}", include_in_schema=False)
    async def asset(file: str) -> FileResponse:
        media_type = FILES.get(file)
        if media_type is None:
            raise HTTPException(status_code=404, detail="Not Found")
        return FileResponse(
            folder / file, media_type=media_type, headers={"cache-control": "public, max-age=86400"}
        )
