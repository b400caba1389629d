#!/usr/bin/env bash
# Fetch, here, the wheels scripts/gpu_serve_check.sh installs on the GPU machine (no registry there):
# nvidia-pytriton 0.7.0 (tritonserver 2.51, python backend, stubs), tritonclient (pure Python) and what
# it imports that the machine lacks (python-rapidjson; protobuf at least the version tritonclient's
# generated code checks); for the python-backend stubs alone, numpy 1.26.4 in stubs/: the 2.51 stub is
# built with pybind11 2.10, which reads numpy 2's arrays wrongly (python_backend#384, fixed after 2.51;
# the GPU machine has numpy 2). For Python 3.12 on x86-64 (the GPU machine's).
# nvidia-pytriton's wheel (53 MiB) is repacked smaller (26 MiB): only the 3.12 stub, without the
# libpython 3.13 its 3.13 stub needs, LZMA-compressed (pip installs it; minutes of CPU, once).
# Into .device-wheels/ (ignored through .git/info/exclude, never committed), which travels with the
# working tree when named in the device call's `carry`: all that travels must stay under 64 MiB.
#
# Usage: scripts/gpu_wheels.sh          (PYTHON=... picks the pip; versions below)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device-wheels
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
# tritonclient and protobuf as this checkout's venv has them (the versions the tests ran with)
TRITONCLIENT="${TRITONCLIENT_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("tritonclient"))')}"
PROTOBUF="${PROTOBUF_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("protobuf"))')}"
RAPIDJSON="${RAPIDJSON_VERSION:-1.25}"
grep -qx '/.device-wheels/' .git/info/exclude 2>/dev/null || echo '/.device-wheels/' >>.git/info/exclude
mkdir -p "$DEST"
platforms=()
for n in 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEST" \
    "nvidia-pytriton==0.7.0" "tritonclient==$TRITONCLIENT" "python-rapidjson==$RAPIDJSON" "protobuf==$PROTOBUF"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEST/stubs" "numpy==1.26.4"
"$PY" - "$DEST"/nvidia_pytriton-0.7.0-*.whl <<'PYEOF'
import sys, zipfile
from pathlib import Path

src = Path(sys.argv[1])
with zipfile.ZipFile(src) as zin:
    if all(i.compress_type == zipfile.ZIP_LZMA for i in zin.infolist()):
        sys.exit(0)  # repacked already
    drop = lambda n: ("python_backend_stubs/" in n and "/3.12/" not in n) or "/libpython3-" in n
    tmp = src.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            if not drop(info.filename):
                zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
tmp.replace(src)
PYEOF
wheels=$(du -cb "$DEST"/*.whl "$DEST"/stubs/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -1 "$DEST" "$DEST/stubs"
echo "wheels $((wheels / 1048576)) MiB + working tree $((tree / 1048576)) MiB (limit 64 MiB together)"
if [ $((wheels + tree)) -gt $((64 * 1048576)) ]; then
    echo "over the device's 64 MiB: remove other wheels from $DEST" >&2
    exit 1
fi
