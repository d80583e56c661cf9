#!/usr/bin/env bash
# Smoke test of Ferry in a cluster, for deploy.yml and rollback.yml: through SMOKE_URL when set (the
# environment's public address), otherwise through a port-forward to the Service in NAMESPACE.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${SMOKE_URL:-}" ]; then
  exec python3 "$here/smoke.py" "$SMOKE_URL" --timeout 120
fi
: "${NAMESPACE:?set NAMESPACE (or SMOKE_URL)}"
kubectl -n "$NAMESPACE" port-forward service/ferry 18000:8000 >/dev/null 2>&1 &
forward=$!
trap 'kill "$forward" 2>/dev/null || true' EXIT
python3 "$here/smoke.py" http://127.0.0.1:18000 --timeout 120
