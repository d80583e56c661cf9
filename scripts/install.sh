#!/usr/bin/env bash
# The one install path of Ferry, used by `make` and by docker/Dockerfile.cpu alike.
#
#   FERRY_VENV=.venv        virtual environment to create/use ("" installs into the current Python)
#   FERRY_EXTRAS=dev        extras of pyproject.toml to install ("" for none, "gpu", "dev", "dev,gpu")
#   FERRY_EDITABLE=1        editable install of the source tree (0 for a normal one, as in images)
#   TORCH_SPEC=torch==2.13.0
#   TORCH_INDEX_URL=        optional package index for torch (PyTorch's CPU wheel index keeps a CPU
#                           machine from pulling the multi-GB CUDA build)
#
# torch is installed first and pinned, so the project's looser range never pulls another build. With the
# gpu extra, onnxruntime-gpu replaces onnxruntime (below).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FERRY_VENV-.venv}
extras=${FERRY_EXTRAS-dev}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
py=${PYTHON:-python3}
if [ -n "$venv" ]; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$torch_spec"
else
  "${pip[@]}" "$torch_spec"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
if [ "${FERRY_EDITABLE:-1}" = 1 ]; then
  "${pip[@]}" -e "$target" "$torch_spec"
else
  "${pip[@]}" "$target" "$torch_spec"
fi
# `onnxruntime` (a base dependency) and `onnxruntime-gpu` (the gpu extra) install the same Python
# package, and whichever pip unpacked last wins, file by file. With the gpu extra, keep only the GPU
# build, at the version pip chose, and check that it has the CUDA provider.
if [[ ",$extras," == *",gpu,"* ]]; then
  ort=$("$py" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
  "$py" -m pip uninstall -y -q onnxruntime onnxruntime-gpu
  "${pip[@]}" --no-deps "onnxruntime-gpu==$ort"
  "$py" -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p"
fi
