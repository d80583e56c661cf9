"""What the benchmark measures: the server configurations (``Instance``), the scenarios (model, rows
per request, connections, protocol, which servers) and the request bodies each server gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ALIAS = "champion"
ONNX, TORCH, CNN = "tabular-mlp-onnx", "tabular-mlp", "image-cnn"
CHURN = "churn-sklearn"
"""A scikit-learn Pipeline over a DataFrame (``models/tabular.py``, registered by ``python
models/tabular.py``): its inputs are records of named, typed columns."""
FEATURES, IMAGE = 64, (3, 64, 64)
CONTRACTS = ("month-to-month", "one-year", "two-year")
ALLOW_SKLEARN = (("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true"), ("FERRY_ALLOWED_FLAVORS", "sklearn"))
"""Ferry loads a scikit-learn model only with these: its flavor allowed, and pickle, without which MLflow
loads no scikit-learn model, skops included (Ferry's defaults refuse both)."""
UNIQUE = "__N__"
"""Token in a body that wrk's script replaces by a fresh integer per request (``wrk/post.lua``)."""


# ------------------------------------------------------------------------------------------------ definitions
@dataclass(frozen=True)
class Instance:
    """One server process configuration. Runs against it happen while it is up, then it stops."""

    key: str
    server: str  # "ferry", "mlflow" or "floor"
    variant: str  # how this Ferry is configured ("" for the default: batching on, cache off)
    models: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    """Serving processes: ``FERRY_WORKERS`` for Ferry, ``--workers`` for MLflow and the floor."""


TWO = "2 workers"
"""The variant of the worker-process comparison (issue 15): every server with 2 processes on one port."""
INSTANCES = {
    i.key: i
    for i in (
        Instance("ferry", "ferry", "", (ONNX, TORCH, CNN), (("FERRY_CACHE__ENABLED", "false"),)),
        Instance(
            "ferry-nobatch",
            "ferry",
            "batching off",
            (CNN,),
            (("FERRY_CACHE__ENABLED", "false"), ("FERRY_BATCH__ENABLED", "false")),
        ),
        Instance("ferry-memory", "ferry", "memory cache", (ONNX,), (("FERRY_CACHE__ENABLED", "true"),)),
        Instance(
            "ferry-redis",
            "ferry",
            "Redis cache",
            (ONNX,),
            (
                ("FERRY_CACHE__ENABLED", "true"),
                ("FERRY_CACHE__MEMORY_BYTES", "0"),
                ("FERRY_CACHE__RESPONSE_BYTES", "0"),
            ),
        ),
        # Its own process: churn-sklearn needs ALLOW_SKLEARN, and the demo models' scenarios do not
        # depend on it being registered. Its queue holds what 64 connections of 256 rows offer (16,384
        # rows; the default 4,096 answers three in four of those requests 503 at once, by design), and a
        # model call takes up to 4,096 rows: a scikit-learn pipeline's call costs about as much for 1 row
        # as for 256 (pandas and validation per call), so the 64-row default leaves 256-row requests
        # unbatched (measured on 2 busy cores: 40 req/s with 64, 150 with 4,096; MLflow 55).
        Instance(
            "ferry-sklearn",
            "ferry",
            "",
            (CHURN,),
            (
                ("FERRY_CACHE__ENABLED", "false"),
                ("FERRY_BATCH__QUEUE_ROWS", "16384"),
                ("FERRY_BATCH__MAX_ROWS", "4096"),
                *ALLOW_SKLEARN,
            ),
        ),
        # The same models with FERRY_GRPC_PORT set (bench_measure.start gives it a free port): one server
        # answers the transport comparison over gRPC, REST v2 binary and REST v2 JSON alike.
        Instance("ferry-grpc", "ferry", "gRPC on", (ONNX, CNN), (("FERRY_CACHE__ENABLED", "false"),)),
        Instance(f"mlflow:{ONNX}", "mlflow", "", (ONNX,)),
        Instance("ferry-2w", "ferry", TWO, (ONNX,), (("FERRY_CACHE__ENABLED", "false"),), workers=2),
        Instance(f"mlflow-2w:{ONNX}", "mlflow", TWO, (ONNX,), workers=2),
        Instance("floor-2w", "floor", TWO, workers=2),
        Instance(f"mlflow:{TORCH}", "mlflow", "", (TORCH,)),
        Instance(f"mlflow:{CNN}", "mlflow", "", (CNN,)),
        Instance(f"mlflow:{CHURN}", "mlflow", "", (CHURN,)),
        Instance("floor", "floor", ""),
    )
}
ORDER = ["ferry", "ferry-nobatch", "ferry-grpc", "ferry-memory", "ferry-redis", "ferry-sklearn"]
ORDER += [f"mlflow:{ONNX}"]
ORDER += [f"mlflow:{TORCH}", f"mlflow:{CNN}", f"mlflow:{CHURN}", "floor"]
ORDER += ["ferry-2w", f"mlflow-2w:{ONNX}", "floor-2w"]
"""Servers start one after another in this order; each runs all its scenarios while it is up."""


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    model: str
    rows: int
    connections: int
    unique: bool
    instances: tuple[str, ...]
    expect_cache_hit: bool = False
    protocol: str = "predict"
    """``predict``: Ferry's and the floor's ``/predict``, MLflow's ``/invocations``; ``v2-binary``: the
    Open Inference Protocol with the binary tensor extension (Ferry; the floor parses its JSON header);
    ``v2-json``: the same request as JSON ``data``; ``grpc``: ``ModelInfer`` with raw tensor contents."""
    generator: str = "wrk"
    """``wrk``, or ``python`` (``bench_measure.run_python_load``: asyncio with aiohttp or grpc.aio, the one
    load generator that speaks both, so the transports of a comparison are driven alike)."""


TRANSPORTS = (("grpc", "grpc", "gRPC (raw contents)"), ("v2-binary", "v2bin", "REST v2 binary"))
TRANSPORTS += (("v2-json", "v2json", "REST v2 JSON"),)
"""The transport comparison (issue 16): protocol, scenario id tag, title."""


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for model, short in ((ONNX, "onnx"), (TORCH, "torch")):
        for conns in (1, 16, 64):
            out.append(
                Scenario(
                    f"{short}-1row-c{conns}",
                    f"{model}, 1 row, {conns} conn",
                    model,
                    1,
                    conns,
                    True,
                    ("ferry", f"mlflow:{model}", "floor"),
                )
            )
    out.append(
        Scenario(
            "cnn-1img-c16",
            f"{CNN}, 1 image, 16 conn",
            CNN,
            1,
            16,
            True,
            ("ferry", "ferry-nobatch", f"mlflow:{CNN}", "floor"),
        )
    )
    out.append(
        Scenario(
            "onnx-256rows-c16",
            f"{ONNX}, 256 rows, 16 conn",
            ONNX,
            256,
            16,
            True,
            ("ferry", f"mlflow:{ONNX}", "floor"),
        )
    )
    out.append(
        Scenario(
            "onnx-256rows-v2bin-c16",
            f"{ONNX}, 256 rows as v2 binary tensors, 16 conn",
            ONNX,
            256,
            16,
            False,
            ("ferry", "floor"),
            protocol="v2-binary",
        )
    )
    out.append(
        Scenario(
            "onnx-1row-cachehit-c64",
            f"{ONNX}, 1 row repeated (cache hit), 64 conn",
            ONNX,
            1,
            64,
            False,
            ("ferry-memory", "ferry-redis", "floor"),
            expect_cache_hit=True,
        )
    )
    for model, rows, short, what in ((ONNX, 64, "onnx-64rows", "64 rows"), (CNN, 1, "cnn-1img", "1 image")):
        for protocol, tag, label in TRANSPORTS:
            out.append(
                Scenario(
                    f"{short}-{tag}-c16",
                    f"{model}, {what} over {label}, 16 conn",
                    model,
                    rows,
                    16,
                    False,
                    ("ferry-grpc",),
                    protocol=protocol,
                    generator="python",
                )
            )
    out.append(
        Scenario(
            "onnx-1row-workers-c64",
            f"{ONNX}, 1 row, 64 conn, 1 and 2 worker processes",
            ONNX,
            1,
            64,
            True,
            ("ferry", "ferry-2w", f"mlflow-2w:{ONNX}", "floor-2w"),
        )
    )
    for rows in (1, 256):
        out.append(
            Scenario(
                f"sklearn-{rows}row{'s' if rows > 1 else ''}-c64",
                f"{CHURN}, {rows} record{'s' if rows > 1 else ''}, 64 conn",
                CHURN,
                rows,
                64,
                True,
                ("ferry-sklearn", f"mlflow:{CHURN}", "floor"),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------- bodies
def rows_json(model: str, rows: int, seed: int = 7) -> str:
    """``rows`` inputs as JSON text, rounded like a real client's, the first number replaced by the
    ``__N__`` token (unquoted) so that each request can carry a unique input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if model == CHURN:
        return churn_records(rows, rng)
    if model == CNN:
        value: Any = rng.random((rows, *IMAGE)).round(7).tolist()
        value[0][0][0][0] = UNIQUE
    else:
        value = rng.standard_normal((rows, FEATURES)).round(4).tolist()
        value[0][0] = UNIQUE
    return json.dumps(value).replace(f'"{UNIQUE}"', UNIQUE)


def churn_records(rows: int, rng: Any) -> str:
    """``rows`` customers as JSON records in ``churn-sklearn``'s columns, the first ``monthly_charges``
    replaced by the ``__N__`` token (a whole number is a valid double)."""
    tenure = rng.integers(0, 73, rows)
    monthly = rng.uniform(18.0, 120.0, rows).round(2)
    records: list[dict[str, Any]] = [
        {
            "tenure_months": int(tenure[i]),
            "monthly_charges": float(monthly[i]),
            "total_charges": round(float(tenure[i] * monthly[i]), 2),
            "support_calls": int(rng.poisson(1.5)),
            "contract": CONTRACTS[int(rng.integers(0, 3))],
            "paperless": bool(rng.random() < 0.6),
        }
        for i in range(rows)
    ]
    records[0]["monthly_charges"] = UNIQUE
    return json.dumps(records).replace(f'"{UNIQUE}"', UNIQUE)


V2_HEADER = "Inference-Header-Content-Length"


def body_for(server: str, scenario: Scenario, rows_text: str) -> tuple[bytes, dict[str, str]]:
    """The body and extra headers of the scenario's requests to ``server`` (for ``grpc``: the serialized
    ``ModelInferRequest``)."""
    if scenario.protocol == "v2-binary":
        return v2_binary(scenario.rows, model=scenario.model)
    if scenario.protocol == "v2-json":
        return v2_json(scenario.rows, model=scenario.model)
    if scenario.protocol == "grpc":
        return grpc_request(scenario.rows, model=scenario.model), {}
    model, unique = scenario.model, scenario.unique
    if server != "mlflow":
        text = f'{{"model": "{model}", "inputs": {rows_text}}}'
    elif model == CHURN:  # records, in the form MLflow documents for a DataFrame
        text = f'{{"dataframe_records": {rows_text}}}'
    else:
        text = f'{{"inputs": {rows_text}}}'
    return (text if unique else text.replace(UNIQUE, "0.5")).encode(), {}


def tensor(rows: int, model: str = ONNX, seed: int = 7) -> Any:
    """``rows`` inputs of ``model`` (64 features, or 3x64x64 images) as float32, the same for every
    transport."""
    import numpy as np

    shape = (rows, *IMAGE) if model == CNN else (rows, FEATURES)
    return np.random.default_rng(seed).standard_normal(shape).astype("<f4")


def v2_json(rows: int, model: str = ONNX) -> tuple[bytes, dict[str, str]]:
    """The v2 inference request of ``tensor`` as JSON ``data``."""
    x = tensor(rows, model)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def grpc_request(rows: int, model: str = ONNX) -> bytes:
    """The serialized gRPC ``ModelInferRequest`` of ``tensor``, raw contents, as Triton's client sends."""
    from service.grpc import messages

    x = tensor(rows, model)
    request = messages.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    return bytes(request.SerializeToString())


def v2_binary(rows: int, seed: int = 7, model: str = ONNX) -> tuple[bytes, dict[str, str]]:
    """A v2 inference request (``tabular-mlp-onnx`` unless told) with the input and the output as raw
    float32 (binary tensor data extension): the JSON header, then the tensor's little-endian floats."""
    x = tensor(rows, model, seed)
    data = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + data, {"Content-Type": "application/octet-stream", V2_HEADER: str(len(header))}


GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def path_for(server: str, scenario: Scenario) -> str:
    if scenario.protocol == "grpc":
        return GRPC_INFER
    if scenario.protocol in ("v2-binary", "v2-json"):
        return f"/v2/models/{scenario.model}/infer"
    return "/invocations" if server == "mlflow" else "/predict"
