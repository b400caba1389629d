#!/usr/bin/env bash
# Start Triton on a detserve model repository: the container's ENTRYPOINT (docker/Dockerfile).
#
#   docker run ... detserve-triton:0.1.0                    # serve /models
#   docker run ... detserve-triton:0.1.0 --log-verbose=1    # extra tritonserver flags go last
#   docker run ... detserve-triton:0.1.0 bash               # anything not starting with '-' runs as is
#
# Environment (defaults in brackets):
#   DETSERVE_ADMIN_KEY or DETSERVE_ADMIN_KEY_FILE   the key of the admin APIs (required, see below)
#   DETSERVE_MODEL_REPOSITORY [/models]             a local path or an s3:// / gs:// / as:// URL
#   DETSERVE_EXIT_TIMEOUT_S [30]                    how long SIGTERM waits for in-flight requests
#   DETSERVE_PYTHON_SHM_BYTES [16777216]            python-backend shm: first region per stub
#   DETSERVE_PYTHON_SHM_GROWTH_BYTES [16777216]     ... and each growth step
#   DETSERVE_LOG_VERBOSE [0]
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
  exec "$@"
fi

repository="${DETSERVE_MODEL_REPOSITORY:-/models}"
exit_timeout="${DETSERVE_EXIT_TIMEOUT_S:-30}"
shm_bytes="${DETSERVE_PYTHON_SHM_BYTES:-16777216}"
shm_growth="${DETSERVE_PYTHON_SHM_GROWTH_BYTES:-16777216}"

# The model-repository API (load/unload, with config and file overrides) can make Triton run
# code, so it only answers requests that carry the admin key. A Docker/Kubernetes secret may be
# mounted as a file instead of an environment variable.
key="${DETSERVE_ADMIN_KEY:-}"
if [[ -z "$key" && -n "${DETSERVE_ADMIN_KEY_FILE:-}" ]]; then
  if [[ ! -r "$DETSERVE_ADMIN_KEY_FILE" ]]; then
    echo "detserve: DETSERVE_ADMIN_KEY_FILE=$DETSERVE_ADMIN_KEY_FILE is not a readable file" >&2
    exit 64
  fi
  key="$(<"$DETSERVE_ADMIN_KEY_FILE")"
  key="${key%$'\r'}"
fi
# The key travels inside one flag (<apis>:<header>=<value>) and as an HTTP header value: keep it
# to characters that need no quoting anywhere, and long enough not to be guessed.
if [[ ! "$key" =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
  echo "detserve: set DETSERVE_ADMIN_KEY (or DETSERVE_ADMIN_KEY_FILE) to a random key of at least 16" \
    "characters from [A-Za-z0-9._~-], e.g. \$(openssl rand -hex 32); the model-repository API is" \
    "not served without one" >&2
  exit 64
fi
for value in "$exit_timeout" "$shm_bytes" "$shm_growth" "${DETSERVE_LOG_VERBOSE:-0}"; do
  if [[ ! "$value" =~ ^[0-9]+$ ]]; then
    echo "detserve: expected a whole number, got '$value' (DETSERVE_EXIT_TIMEOUT_S / *_SHM_*_BYTES / LOG_VERBOSE)" >&2
    exit 64
  fi
done

# Admin group: loading/unloading models, reading configs, registering shared-memory regions,
# changing trace and log settings. Health, metadata, inference and statistics stay open
# (probes, clients, `detserve loadtest`'s server-side split). Header to send:
#   gRPC: triton-grpc-protocol-admin-key: <key>      HTTP: admin-key: <key>
admin_apis="model-repository,model-config,shared-memory,trace,logging"

exec tritonserver \
  --model-repository="$repository" \
  --model-control-mode=explicit \
  "--load-model=*" \
  --strict-readiness=true \
  --exit-on-error=true \
  --exit-timeout-secs="$exit_timeout" \
  "--backend-config=python,shm-default-byte-size=$shm_bytes" \
  "--backend-config=python,shm-growth-byte-size=$shm_growth" \
  "--grpc-restricted-protocol=$admin_apis:admin-key=$key" \
  "--http-restricted-api=$admin_apis:admin-key=$key" \
  --log-verbose="${DETSERVE_LOG_VERBOSE:-0}" \
  "$@"
