#!/usr/bin/env bash
# Create .venv and install detserve with everything needed to build, serve and test.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Debian's package starts its own nginx service on install; detserve runs nginx from its own config
# (the gate). Stop only that service: through `service`, else the master in the package's pid file
# (nothing else writes /run/nginx.pid; nginx was not installed before). Never other users' nginx.
stop_packaged_nginx() {
  service nginx stop >/dev/null 2>&1 && return 0
  local pid
  pid=$(cat /run/nginx.pid 2>/dev/null) || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = nginx ] && kill -QUIT "$pid" 2>/dev/null
  return 0
}
# nginx is detserve's gate: the public address in front of tritonserver (detserve/ops/gate.py), which
# checks the admin key. Every server detserve starts needs it.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >/dev/null 2>&1 \
      && stop_packaged_nginx \
      || { echo "error: could not install nginx-light, which detserve's gate needs" >&2; exit 1; }
  else
    echo "error: nginx is not installed; detserve's gate needs it: sudo apt-get install nginx-light" >&2
    exit 1
  fi
fi
# The gate's nginx workers drop root for this system user (no login, no home); it reaches
# tritonserver's sockets through the runtime directory's group (detserve/ops/gate.py). Without it
# detserve still runs, with root workers and a warning.
if [ "$(id -u)" = 0 ] && ! id detserve-gate >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin detserve-gate \
    || echo "warning: could not create the user detserve-gate; the gate's workers will run as root" >&2
fi
# Node.js and two npm packages run the gRPC example of docs/contract.md (tests/integration/test_contract.py).
# Packages: pinned in scripts/node/package-lock.json, installed with `npm ci` into .node/ (gitignored; npm's
# cache there too, install scripts off: nothing is written outside the checkout). Without node the test skips.
if ! command -v node >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm) >/dev/null 2>&1 \
    || echo "warning: could not install nodejs/npm: the Node example of docs/contract.md will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1 && ! cmp -s scripts/node/package-lock.json .node/package-lock.json; then
  mkdir -p .node && cp scripts/node/package.json scripts/node/package-lock.json .node/
  (cd .node && npm_config_cache="$PWD/npm-cache" npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null) \
    || { rm -f .node/package-lock.json; echo "warning: npm ci failed: the Node example of docs/contract.md will be skipped" >&2; }
fi
# Debian's chromium: the live view of `detserve stream` is tested in a real headless browser
# (tests/integration/test_stream.py). Playwright/Puppeteer browser downloads are not used. Without it the test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium: the live-view browser test will be skipped" >&2
fi
# GStreamer's RTSP server for the system python3: the real RTSP camera of the stream tests (tests/rtsp_server.py).
# Without it those tests skip.
if ! /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gir1.2-gst-rtsp-server-1.0 \
    python3-gst-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad) >/dev/null 2>&1 \
    || echo "warning: could not install GStreamer's RTSP server: the RTSP stream tests will be skipped" >&2
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
# mmdet family (detserve/families/mmdet/, docs/families-mmdet.md): the three OpenMMLab packages without their
# declared dependencies -- mmengine and mmcv-lite require opencv-python, a second cv2 over opencv-python-headless
# whose releases need numpy 2; the rest they need is the "mmdet" extra, installed above through dev.
.venv/bin/python -m pip install -q --no-deps -c scripts/constraints.txt mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0
# mmcv's CPU soft-NMS, the reference side of CornerNet's post-processing (mmcv-lite has no compiled ops): its own
# nms.cpp from the mmcv 2.1.0 sdist (sha256 checked before use), compiled alone into detserve's cache (~30 s).
if ! .venv/bin/python -c "from detserve.families.mmdet.zoo import softnms_available as a; raise SystemExit(not a())"; then
  mmcv_tmp=$(mktemp -d)
  if curl -sSfL -o "$mmcv_tmp/mmcv-2.1.0.tar.gz" \
    https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz \
    && PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m detserve.families.mmdet.zoo "$mmcv_tmp/mmcv-2.1.0.tar.gz" >/dev/null 2>&1; then
    :
  else
    echo "warning: could not build mmcv's soft-NMS (needs curl, a C++ compiler, ninja): CornerNet's reference tests will skip" >&2
  fi
  rm -rf "$mmcv_tmp"
fi
.venv/bin/python -c "import torch, torchvision, onnxruntime, tritonclient, pytriton; print('detserve env ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
