#!/usr/bin/env bash
# Prove the TensorRT path on a CUDA machine, in under 13 minutes:
#   scripts/gpu_check.py     builds the demo detector's fp32/fp16/int8 engines, verifies each
#                            against ONNX Runtime, checks GPU post-processing against CPU, builds
#                            the end-to-end NMS variant, builds and verifies RT-DETR engines (grid-sample
#                            and discrete-sampling cores: a wrong GridSample engine must be refused,
#                            NVIDIA/TensorRT #4813), builds a Faster R-CNN and a Mask R-CNN with
#                            --target tensorrt (an engine per core step, each verified against ONNX
#                            Runtime per output: rcnn_engines), benchmarks against eager PyTorch
#                            (results: OUT/gpu_check.json, written step by step)
#   pytest -m gpu            the GPU tests of tests/unit/test_tensorrt.py (OUT/pytest_gpu.txt)
#   detserve compare         the trained demo detector built as a TensorRT fp32 engine: detections of
#                            PyTorch vs ONNX Runtime vs TensorRT per score band on 16 held-out test
#                            images (OUT/compare/compare.{md,html,json}, log OUT/compare.txt)
#
# Prerequisites, installed beforehand (this script installs nothing):
#   - an NVIDIA GPU with a driver for CUDA 13 (nvidia-smi works)
#   - a Python with the project and its TensorRT extra:  pip install -e '.[tensorrt,dev]'
#     (= the convert extra + tensorrt-cu13>=10.13.2,<11; TensorRT 11 builds fp32 only)
#
# Usage: scripts/gpu_check.sh [OUT_DIR]      (default out/gpu_check; PYTHON=... picks the interpreter)
# Exit status: 0 when every step passed, 1 otherwise (the JSON says which and why).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv >"$OUT/nvidia-smi.csv" 2>&1 \
    || echo "warning: nvidia-smi failed (see $OUT/nvidia-smi.csv)"
if ! "$PY" -c 'import torch, tensorrt, polygraphy, onnx, onnxruntime; assert torch.cuda.is_available(), "torch sees no CUDA GPU"' \
    2>"$OUT/prerequisites.txt"; then
    echo "prerequisites missing ($OUT/prerequisites.txt):"; cat "$OUT/prerequisites.txt"
    echo "install them first: pip install -e '.[tensorrt,dev]' on a machine with an NVIDIA GPU"
    exit 2
fi

status=0
timeout --signal=INT 520 "$PY" scripts/gpu_check.py --out "$OUT" --budget-s 480 || status=1
timeout --signal=INT 90 "$PY" -m pytest -q -m gpu tests/unit/test_tensorrt.py -p no:cacheprovider \
    >"$OUT/pytest_gpu.txt" 2>&1 || status=1
tail -n 3 "$OUT/pytest_gpu.txt"
{
    "$PY" -m detserve.app.cli dataset test "$OUT/shapes_test" --limit 16 \
    && timeout 150 "$PY" -m detserve.app.cli build ssdlite320_mobilenet_v3_large --repository "$OUT/trt_repo" --name demo \
        --num-classes 6 --checkpoint detserve/weights/demo_ssdlite320_shapes.pt --target tensorrt \
    && timeout 120 "$PY" -m detserve.app.cli compare --model demo --repository "$OUT/trt_repo" --out "$OUT/compare" --require-tensorrt \
        "$OUT/shapes_test/images"
} >"$OUT/compare.txt" 2>&1 || status=1
tail -n 4 "$OUT/compare.txt"
echo "results: $OUT/gpu_check.json, $OUT/pytest_gpu.txt (exit $status)"
exit "$status"
