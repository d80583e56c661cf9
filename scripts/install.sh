#!/usr/bin/env bash
# The one install path of Ferry, used by `make` and by docker/Dockerfile.cpu and Dockerfile.gpu alike.
#
#   FERRY_VENV=.venv        virtual environment to create/use ("" installs into the current Python)
#   FERRY_EXTRAS=dev        extras of pyproject.toml: "" (the images), "dev" (make), "gpu", "dev,gpu"
#   FERRY_EDITABLE=1        editable install of the source tree (0 for a normal one, as in images)
#   TORCH_INDEX_URL=        extra package index for torch's CPU build (2.13.0+cpu, not on PyPI), e.g.
#                           https://download.pytorch.org/whl/cpu. Unset: pip's configured sources, and
#                           PyTorch's CPU index if torch is not found there. GPU installs take PyPI's torch.
#
# Every dependency comes from a lock file (exact versions, sha256 hashes, pip --require-hashes, wheels
# only, so no package runs code at install), chosen by the extras:
#   ""  locks/cpu.txt    dev  locks/cpu-dev.txt    gpu  locks/gpu.txt    dev,gpu  locks/gpu-dev.txt
# `make lock` (scripts/lock.py) writes them from pyproject.toml. Ferry itself is installed afterwards
# with --no-deps and without build isolation (its build requirements are in the lock too).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FERRY_VENV-.venv}
extras=${FERRY_EXTRAS-dev}
py=${PYTHON:-python3}
dev=0 gpu=0
IFS=, read -ra wanted <<<"$extras"
for extra in "${wanted[@]}"; do
  case "$extra" in
    dev) dev=1 ;;
    gpu) gpu=1 ;;
    "") ;;
    *) echo "install.sh: no lock file for extra '$extra' (locks/ has \"\", dev, gpu and dev,gpu)" >&2; exit 2 ;;
  esac
done
lock=locks/cpu
if ((gpu)); then lock=locks/gpu; fi
if ((dev)); then lock+=-dev; fi
lock+=.txt
if [ -n "$venv" ]; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)
# `onnxruntime` (CPU) and `onnxruntime-gpu` install the same Python package, file by file; the GPU locks
# hold only the latter, the CPU locks only the former. Switching an environment between them removes
# both first, so the lock's build is installed whole.
other=onnxruntime-gpu
if ((gpu)); then other=onnxruntime; fi
if "$py" -m pip show -q "$other" >/dev/null 2>&1; then
  "$py" -m pip uninstall -y -q onnxruntime onnxruntime-gpu
fi
locked=("${pip[@]}" --require-hashes --only-binary :all: -r "$lock")
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${locked[@]}" --extra-index-url "$TORCH_INDEX_URL"
elif ! "${locked[@]}"; then
  if ((gpu)) || [ -n "${TORCH_INDEX_URL+set}" ]; then exit 1; fi
  echo "install.sh: retrying with PyTorch's CPU index for torch's CPU build (TORCH_INDEX_URL= skips it)" >&2
  "${locked[@]}" --extra-index-url https://download.pytorch.org/whl/cpu
fi
project=(.)
[ "${FERRY_EDITABLE:-1}" = 1 ] && project=(-e .)
"${pip[@]}" --no-deps --no-build-isolation "${project[@]}"
if ((gpu)); then
  "$py" -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p"
fi
