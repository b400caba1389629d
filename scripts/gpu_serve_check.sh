#!/usr/bin/env bash
# The served GPU pipeline on a GPU machine, in a few minutes (issue 28, part 4): scripts/gpu_serve_check.py
# runs the GPU tests, the pre-processing bound (GPU vs CPU tensor of the same file), builds the demo
# detector with --target python-torch --device gpu, serves it with the embedded tritonserver and checks
# parity against eager PyTorch on the same GPU and throughput/latency at 1-64 users with the server-side
# split. Everything lands under OUT_DIR as files: gpu_serve_check.{md,json}, pytest_gpu.txt, build.txt,
# tritonserver.log.
#
# The GPU machine has torch, torchvision, numpy, onnxruntime, grpcio and pytest, but no registry: the
# wheels scripts/gpu_wheels.sh fetched here into .device-wheels/ travel with the tree (device call:
# carry [".device-wheels"]) and are installed with --no-deps into a private folder. The python-backend
# stubs run Python isolated (PYTHONPATH ignored; detserve/ops/embedded.py), so that folder and this
# checkout also go into a .pth of the machine's own site-packages (the machine is bare and given back),
# which also puts numpy 1.26 first for the stubs alone: Triton 2.51's stub cannot read numpy 2 arrays.
#
# Usage:
#   scripts/gpu_serve_check.sh [OUT_DIR]             on the GPU machine (default $OUT, else out/gpu_serve_check)
#   scripts/gpu_serve_check.sh --dry-run [OUT_DIR]   here, on the CPU: the same steps, tiny loads, this venv
# Device call (one): command "bash scripts/gpu_serve_check.sh", carry [".device-wheels"], timeout_s 600.
# Exit status: 0 when every step passed, 1 when one failed (the JSON says which and why), 2 set-up.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
OUT_DIR="${1:-${OUT:-out/gpu_serve_check}}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
mkdir -p "$OUT_DIR"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

if [ ${#dry[@]} -eq 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT_DIR/nvidia-smi.csv" 2>&1 \
        || echo "warning: nvidia-smi failed"
    if ! ls .device-wheels/*.whl >/dev/null 2>&1; then
        echo "no wheels in .device-wheels/: run scripts/gpu_wheels.sh on the development machine and carry the folder"
        exit 2
    fi
    site="$(mktemp -d /tmp/detserve-site.XXXXXX)"
    stubsite="$(mktemp -d /tmp/detserve-stub-site.XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .device-wheels/*.whl || exit 2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stubsite" .device-wheels/stubs/*.whl \
        || exit 2
    # the stub links the machine's libpython3.12 (detserve/ops/embedded.py puts LIBDIR first)
    libdir="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
    stub="$site/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"
    if LD_LIBRARY_PATH="$libdir:$site/nvidia_pytriton.libs" ldd "$stub" | grep 'not found' >"$OUT_DIR/setup.txt"; then
        echo "the python-backend stub misses libraries here ($OUT_DIR/setup.txt):"; cat "$OUT_DIR/setup.txt"; exit 2
    fi
    # tritonclient's generated gRPC code refuses an older grpcio than it was generated with
    if ! PYTHONPATH="$site" "$PY" -c 'import tritonclient.grpc' 2>"$OUT_DIR/setup.txt"; then
        echo "tritonclient does not import here ($OUT_DIR/setup.txt):"; tail -n 3 "$OUT_DIR/setup.txt"; exit 2
    fi
    sitepackages="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
    # the stubs (sys.prefix: detserve's stub prefix) get numpy 1.26 first; this process keeps the machine's numpy 2
    printf '%s\n%s\nimport sys; sys.path.insert(0, "%s") if "stub-prefix" in sys.prefix else None\n' \
        "$PWD" "$site" "$stubsite" >"$sitepackages/detserve-device-check.pth" || exit 2
    export PYTHONPATH="$site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout --signal=INT 560 "$PY" scripts/gpu_serve_check.py --out "$OUT_DIR" "${dry[@]}"
status=$?
[ -f "$OUT_DIR/gpu_serve_check.md" ] && cat "$OUT_DIR/gpu_serve_check.md"
exit "$status"
