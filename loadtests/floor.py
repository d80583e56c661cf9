"""The HTTP floor of this machine: a bare FastAPI app on uvicorn that parses the request body with
orjson, as Ferry does, and answers a constant.

It serves the paths the benchmark and the load tests call (``/predict``, ``/models/{name}/predict``,
``/invocations``, ``/models/{name}/invocations``, ``/v2/models/{name}/infer``) so that the same load
drives it and Ferry. No server that parses the same JSON on the same machine can be faster by much, so
Ferry's throughput is reported as a share of this one's. A body with the Open Inference Protocol's
``Inference-Header-Content-Length`` header has only that JSON header parsed; its binary tensors are
left as bytes.

    python loadtests/floor.py --port 8001 [--workers 2]

``--workers N`` runs N uvicorn processes on the port (uvicorn's own supervisor: spawned, one shared
socket), the floor of a server with N processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

CONSTANT = orjson.dumps({"model": "floor", "version": "1", "outputs": [[0.0] * 10]})
_BAD = orjson.dumps({"error": {"code": "bad_request", "message": "body is not a JSON object"}})


def create_app() -> FastAPI:
    app = FastAPI(title="Ferry benchmark floor", openapi_url=None, docs_url=None, redoc_url=None)

    async def answer(request: Request) -> Response:
        raw = await request.body()
        header = request.headers.get("inference-header-content-length")
        try:
            body = orjson.loads(raw[: int(header)] if header and header.isdigit() else raw)
        except orjson.JSONDecodeError:
            return Response(_BAD, status_code=400, media_type="application/json")
        if not isinstance(body, dict):
            return Response(_BAD, status_code=400, media_type="application/json")
        return Response(CONSTANT, media_type="application/json")

    async def ready() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    for path in (
        "/predict",
        "/models/{name}/predict",
        "/invocations",
        "/models/{name}/invocations",
        "/v2/models/{name}/infer",
    ):
        app.add_api_route(path, answer, methods=["POST"])
    for path in ("/health/ready", "/ping"):
        app.add_api_route(path, ready, methods=["GET"])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes on the port")
    args = parser.parse_args(argv)
    import uvicorn

    # The same server settings as ``ferry serve``: uvloop and httptools when installed, no access log.
    if args.workers > 1:  # uvicorn's workers import the app by name, in fresh interpreters
        here = str(Path(__file__).resolve().parent)
        uvicorn.run(
            "floor:create_app", factory=True, app_dir=here, workers=args.workers,
            host=args.host, port=args.port, access_log=False, log_level="warning",
        )  # fmt: skip
        return 0
    uvicorn.run(create_app(), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
