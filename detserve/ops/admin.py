"""The admin key and the key-protected model-repository API (load, unload, repository index).

The key comes from the file named by ``DETSERVE_ADMIN_KEY_FILE`` (keep it 0600) or from
``DETSERVE_ADMIN_KEY``, is at least 16 characters of ``[A-Za-z0-9._~-]``, and never travels on a
command line: the gate (detserve/ops/gate.py, nginx in front of tritonserver) checks it in a header --
over HTTP ``admin-key``, over gRPC ``triton-grpc-protocol-admin-key`` (the header Triton itself
used for restricted protocols) -- and answers a request without it, or with a wrong one,
``PERMISSION_DENIED``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

from detserve.errors import ClientError, DetserveError
from detserve.ops.gate_fleet import REPLICA_HEADER

ENV_VAR = "DETSERVE_ADMIN_KEY"
FILE_ENV = "DETSERVE_ADMIN_KEY_FILE"
HEADER = "admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"
_KEY = re.compile(r"^[A-Za-z0-9._~-]{16,}$")
_KEY_HINT = "use a random key of at least 16 characters from [A-Za-z0-9._~-], e.g. $(openssl rand -hex 32)"


class AdminError(DetserveError):
    """The admin API refused or failed a request."""


class AdminKeyError(AdminError):
    """No usable admin key: unreadable key file or a key that breaks the rules."""


class AdminRefusedError(AdminError):
    """The server refused a restricted API: no key sent, or not the server's key."""


class ModelLoadError(AdminError):
    """Triton could not load (a version of) a model; what it served before keeps serving."""


def validate_key(key: str, source: str = ENV_VAR) -> str:
    if not _KEY.match(key):
        raise AdminKeyError(f"the admin key from {source} is not valid ({len(key)} characters)", hint=_KEY_HINT)
    return key


def _read_key_file(path: str, file_env: str) -> str:
    """The key in ``path``; refused when group or others may read or write the file: a key others can read is no secret."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode  # of the file read, not of whatever the name points to later
            if mode & 0o077:
                raise AdminKeyError(
                    f"{file_env}={path} is readable or writable by group or others (mode {mode & 0o777:04o})",
                    hint=f"chmod 600 {path}",
                )
            text = f.read()
    except OSError as e:
        raise AdminKeyError(f"{file_env}={path} is not a readable file: {e.strerror or e}") from e
    text = text.rstrip("\n")  # as the entrypoint's $(<file): trailing newlines go, then one CR
    return text[:-1] if text.endswith("\r") else text


def admin_key(env_var: str = ENV_VAR, file_env: str = FILE_ENV) -> str | None:
    """The configured admin key, or None when neither variable is set (empty counts as unset).

    Same rule as docker/entrypoint.sh: the variable wins; the file is read only when it is empty.
    """
    key = os.environ.get(env_var, "")
    if key:
        return validate_key(key, env_var)
    path = os.environ.get(file_env, "")
    return validate_key(_read_key_file(path, file_env), f"{file_env}={path}") if path else None


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the server's repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelAdmin:
    """Load, unload and list models over gRPC, sending the admin key with every call.

    ``replica``: the index of one tritonserver behind a ``--replicas N`` gate that every call goes to
    (``ops/gate_fleet.py``; the gate honours it only with the key); None: whichever the gate picks.
    """

    def __init__(self, url: str, key: str | None, timeout_s: float = 300.0, replica: int | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.key = key
        self.timeout_s = timeout_s
        self.replica = replica
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except Exception as e:
            raise ClientError(f"cannot connect to {url}: {e}") from e

    @property
    def headers(self) -> dict[str, str] | None:
        headers = {GRPC_HEADER: self.key} if self.key else {}
        if self.replica is not None:
            headers[REPLICA_HEADER] = str(self.replica)
        return headers or None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self) -> ModelAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, headers=self.headers, client_timeout=self.timeout_s, **kwargs)
        except Exception as e:
            raise self._error(what, e) from e

    def _error(self, what: str, e: Exception) -> DetserveError:
        status = str(getattr(e, "status", lambda: "")() or "")
        message = str(getattr(e, "message", lambda: str(e))() or e)
        if "PERMISSION_DENIED" in status:
            if "without an admin key" in message:  # the gate says: no key configured, the APIs are closed
                return AdminRefusedError(
                    f"{what}: refused: the server was started without an admin key, so its admin APIs are closed",
                    hint=f"restart the server (`detserve serve`) with {FILE_ENV} (or {ENV_VAR}) set, then set the same here",
                )
            sent = f"the key from {ENV_VAR}/{FILE_ENV} was sent" if self.key else f"no key was sent: {ENV_VAR} is not set"
            return AdminRefusedError(
                f"{what}: refused: the admin key is missing or wrong ({sent})",
                hint=f"set {FILE_ENV} (or {ENV_VAR}) to the key the server was started with",
            )
        if "UNAVAILABLE" in status:
            return ClientError(f"no Triton server answers at {self.where}: {message}", hint="start one with `detserve serve`")
        return AdminError(f"{what}: {message}")

    @property
    def where(self) -> str:
        return self.url if self.replica is None else f"{self.url} (replica {self.replica})"

    def load_model(self, name: str, config: str | None = None) -> None:
        """Load (or reload) ``name``; ``config``: a JSON ModelConfig that overrides its config.pbtxt.

        A failed load raises ModelLoadError naming Triton's reason and the versions of ``name``
        that still serve: Triton keeps a loaded version until its replacement is ready, and a
        failed model takes no other model down with it.
        """
        kwargs = {} if config is None else {"config": config}
        try:
            self._call(f"load {name!r}", self._client.load_model, name, **kwargs)
        except AdminError as e:
            if isinstance(e, AdminRefusedError) or not e.message.startswith("load "):
                raise
            raise self._load_error(name, e.message.split(": ", 1)[-1]) from e

    def _load_error(self, name: str, triton_message: str) -> ModelLoadError:
        reason = triton_message.split("\n\nAt:", 1)[0].strip().rstrip(";").strip()  # drop the stub's traceback
        reason = reason.removeprefix(f"load failed for model '{name}': ")
        if "failed to poll from model repository" in reason:
            reason += f" ({self._unreadable_configs(name)}: Triton's log names the file and line)"
        try:
            serving = sorted(e.version for e in self.get_model_repository_index() if e.name == name and e.state == "READY")
        except DetserveError:
            serving = []
        still = f"; still serving {name} version {', '.join(serving)}" if serving else f"; {name} is not serving"
        return ModelLoadError(
            f"load {name!r} failed: {reason}{still}; the other models are unaffected",
            hint=f"fix or remove the broken files under the repository's {name}/ (or its steps') and load again "
            "(`detserve models list` shows each version's state and reason)",
        )

    def _unreadable_configs(self, name: str) -> str:
        """Which config.pbtxt Triton could not read: an ensemble's load polls its steps too."""
        try:
            config = self.model_config(name)
        except DetserveError:
            config = {}
        steps = sorted({s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])})
        if not steps:
            return f"Triton could not read {name}/config.pbtxt or its directory"
        files = ", ".join(f"{m}/config.pbtxt" for m in [name, *steps])
        return f"Triton could not read one of {files} (an ensemble's load reads its steps' configs too)"

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return bool(self._call(f"readiness of {name!r}", self._client.is_model_ready, name, version))

    def unload_model(self, name: str) -> None:
        self._call(f"unload {name!r}", self._client.unload_model, name)

    def model_config(self, name: str) -> dict[str, Any]:
        """The config ``name`` is served with, as JSON (the model-config API: restricted by the entrypoint)."""
        raw = self._call(f"config of {name!r}", self._client.get_model_config, name, as_json=True)
        return dict(raw.get("config", {}))

    def get_model_repository_index(self) -> list[IndexEntry]:
        raw = self._call("repository index", self._client.get_model_repository_index, as_json=True)
        return [
            IndexEntry(str(m["name"]), str(m.get("version", "")), str(m.get("state", "")), str(m.get("reason", "")))
            for m in raw.get("models", [])
        ]
