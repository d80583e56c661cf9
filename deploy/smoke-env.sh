#!/usr/bin/env bash
# Smoke test of Ferry in a cluster, for deploy.yml and rollback.yml: through SMOKE_URL when set (the
# environment's public address), otherwise through a port-forward to the Service in NAMESPACE.
# What it predicts with: SMOKE_MODEL (default tabular-mlp-onnx, a demo model) and SMOKE_INPUT (the
# request's "inputs" as JSON; empty: one row of 64 zeros, the demo model's shape); SMOKE_API_KEY is
# sent as a Bearer token when set (Ferry in deploy/ requires one of FERRY_API_KEYS).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
args=(--timeout 120 --model "${SMOKE_MODEL:-tabular-mlp-onnx}" --input "${SMOKE_INPUT:-}")
if [ -n "${SMOKE_URL:-}" ]; then
  exec python3 "$here/smoke.py" "$SMOKE_URL" "${args[@]}"
fi
: "${NAMESPACE:?set NAMESPACE (or SMOKE_URL)}"
kubectl -n "$NAMESPACE" port-forward service/ferry 18000:8000 >/dev/null 2>&1 &
forward=$!
trap 'kill "$forward" 2>/dev/null || true' EXIT
python3 "$here/smoke.py" http://127.0.0.1:18000 "${args[@]}"
