#!/usr/bin/env bash
# Start Triton on a detserve model repository: the container's ENTRYPOINT (docker/Dockerfile).
#
#   docker run ... detserve-triton:0.1.0                    # serve /models
#   docker run ... detserve-triton:0.1.0 --log-verbose=1    # extra tritonserver flags (after detserve's)
#   docker run ... detserve-triton:0.1.0 bash               # anything not starting with '-' runs as is
#
# Environment (defaults in brackets):
#   DETSERVE_ADMIN_KEY or DETSERVE_ADMIN_KEY_FILE   the key of the admin APIs (required, see below)
#   DETSERVE_MODEL_REPOSITORY [/models]             a local directory
#   DETSERVE_MAX_REQUEST_BYTES [134217728]          larger requests are refused by the gate
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
max_request="${DETSERVE_MAX_REQUEST_BYTES:-134217728}"

# The model-repository API (load/unload, with config and file overrides) can make Triton run
# code, so the gate only passes requests that carry the admin key. A Docker/Kubernetes secret may
# be mounted as a file instead of an environment variable.
key="${DETSERVE_ADMIN_KEY:-}"
if [[ -z "$key" && -n "${DETSERVE_ADMIN_KEY_FILE:-}" ]]; then
  if [[ ! -r "$DETSERVE_ADMIN_KEY_FILE" ]]; then
    echo "detserve: DETSERVE_ADMIN_KEY_FILE=$DETSERVE_ADMIN_KEY_FILE is not a readable file" >&2
    exit 64
  fi
  key="$(<"$DETSERVE_ADMIN_KEY_FILE")"
  key="${key%$'\r'}"
fi
# The key is compared inside the gate's (0600) nginx config and travels as a header value: keep it
# to characters that need no quoting anywhere, and long enough not to be guessed.
if [[ ! "$key" =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
  echo "detserve: set DETSERVE_ADMIN_KEY (or DETSERVE_ADMIN_KEY_FILE) to a random key of at least 16" \
    "characters from [A-Za-z0-9._~-], e.g. \$(openssl rand -hex 32); the model-repository API is" \
    "not served without one" >&2
  exit 64
fi
for value in "$exit_timeout" "$shm_bytes" "$shm_growth" "$max_request" "${DETSERVE_LOG_VERBOSE:-0}"; do
  if [[ ! "$value" =~ ^[0-9]+$ ]]; then
    echo "detserve: expected a whole number, got '$value' (DETSERVE_EXIT_TIMEOUT_S / *_SHM_*_BYTES / MAX_REQUEST_BYTES / LOG_VERBOSE)" >&2
    exit 64
  fi
done
if [[ "$repository" == *://* ]]; then
  echo "detserve: DETSERVE_MODEL_REPOSITORY must be a local directory (copy a bucket in first, as deploy/k8s/jobs/seed-repository.yaml does onto the shared volume)" >&2
  exit 64
fi

# detserve serve: tritonserver on Unix sockets in a private directory, the gate (nginx) on the
# public ports checking the admin key from this process's environment -- the key is on no command
# line (`ps` shows every process's arguments to every user). It also drains on SIGTERM and
# restarts dead python stubs. Extra arguments are tritonserver flags, passed after detserve's own.
extra=()
for flag in "$@"; do
  extra+=("--triton-arg=$flag")
done
export DETSERVE_ADMIN_KEY="$key"
unset DETSERVE_ADMIN_KEY_FILE
exec detserve serve \
  --repository "$repository" \
  --host 0.0.0.0 \
  --tritonserver /opt/tritonserver/bin/tritonserver \
  --backend-directory /opt/tritonserver/backends \
  --max-request-bytes "$max_request" \
  "--triton-arg=--exit-on-error=true" \
  "--triton-arg=--exit-timeout-secs=$exit_timeout" \
  "--triton-arg=--backend-config=python,shm-default-byte-size=$shm_bytes" \
  "--triton-arg=--backend-config=python,shm-growth-byte-size=$shm_growth" \
  "--triton-arg=--log-verbose=${DETSERVE_LOG_VERBOSE:-0}" \
  "${extra[@]}"
