"""The deployment files (docker/, deploy/k8s/) lint clean and agree with each other.

- hadolint on docker/Dockerfile, yamllint (``.yamllint.yaml``) on every YAML file under docker/
  and deploy/k8s/, kubernetes-validate (strict schemas, shipped with the tool: offline) on every
  Kubernetes manifest. A failure shows the tool's own output. A linter's test is skipped only
  when its executable is not installed (they come with the ``deploy`` extra).
- docker/entrypoint.sh, run against a stand-in ``tritonserver``: the flags it passes, and its
  refusal to start without an admin key.
- Names shared between files (Secret, metric, ports) match.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"
# Oldest Kubernetes the manifests target, and a recent one (both ship with kubernetes-validate).
K8S_VERSIONS = ("1.30", "1.33")


def _yaml_files() -> list[Path]:
    found = [p for d in (ROOT / "docker", K8S) for p in d.rglob("*") if p.suffix in (".yaml", ".yml")]
    return sorted([*found, YAMLLINT_CONFIG])


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _tool(name: str) -> str:
    """The executable beside the running interpreter (the virtualenv), else on PATH; skip if none."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[deploy]')")
    return found


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"


def _load_yaml(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with yamllint / kubernetes-validate
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_the_deployment_files_are_there() -> None:
    # the parametrized tests below would pass vacuously on an empty folder
    kinds = {doc["kind"] for p in _manifests() for doc in _load_yaml(p)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret", "ConfigMap"} <= kinds
    for path in (DOCKERFILE, ENTRYPOINT, COMPOSE, ROOT / "docker" / "prometheus.yml", ROOT / ".dockerignore"):
        assert path.is_file(), path


# --- linters ----------------------------------------------------------------------------------


def test_hadolint_dockerfile() -> None:
    proc = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", _rel(DOCKERFILE)])
    assert proc.returncode == 0 and not proc.stdout.strip(), "hadolint:\n" + _output(proc)


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yamllint(path: Path) -> None:
    proc = _run([_tool("yamllint"), "--strict", "-c", _rel(YAMLLINT_CONFIG), "-f", "parsable", _rel(path)])
    assert proc.returncode == 0, "yamllint:\n" + _output(proc)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _manifests(), ids=_rel)
def test_kubernetes_validate(path: Path, version: str) -> None:
    proc = _run([_tool("kubernetes-validate"), "--strict", "-k", version, _rel(path)])
    # a kind without a schema (a CRD such as ServiceMonitor) is only a WARN: not validated, so fail
    assert proc.returncode == 0 and "WARN" not in proc.stdout + proc.stderr, "kubernetes-validate:\n" + _output(proc)


# --- the entrypoint -----------------------------------------------------------------------------

KEY = "0123456789abcdef0123456789abcdef"


def _entrypoint(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run docker/entrypoint.sh with a stand-in ``detserve`` that prints its arguments and the key it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "detserve"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\necho "KEY=${DETSERVE_ADMIN_KEY:-}" >&2\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DETSERVE_")}
    clean["PATH"] = f"{bin_dir}{os.pathsep}{clean.get('PATH', '')}"
    return _run(["bash", str(ENTRYPOINT), *args], env={**clean, **env})


def test_entrypoint_runs_detserve_serve_with_no_key_on_the_command_line(tmp_path: Path) -> None:
    proc = _entrypoint(tmp_path, {"DETSERVE_ADMIN_KEY": KEY}, "--log-info=false")
    assert proc.returncode == 0, _output(proc)
    argv = proc.stdout.splitlines()
    assert argv[:1] == ["serve"]
    for flag in ("/models", "0.0.0.0", "/opt/tritonserver/bin/tritonserver", "--triton-arg=--exit-timeout-secs=30"):
        assert flag in argv, f"{flag} not in {argv}"
    assert argv[-1] == "--triton-arg=--log-info=false"  # extra flags go last, to tritonserver
    assert KEY not in proc.stdout  # the key reaches detserve through its environment only
    assert f"KEY={KEY}" in proc.stderr


def test_entrypoint_shm_matches_embedded_server(tmp_path: Path) -> None:
    # the container and `detserve serve` give the python stubs the same shared memory
    argv = _entrypoint(tmp_path, {"DETSERVE_ADMIN_KEY": KEY}).stdout.splitlines()
    served = re.findall(r"--backend-config=python,shm-[a-z-]+=\d+", (ROOT / "detserve" / "ops" / "server_options.py").read_text())
    assert served and {f"--triton-arg={f}" for f in served} <= set(argv), (served, argv)


def test_entrypoint_reads_the_key_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text(KEY + "\n")
    proc = _entrypoint(tmp_path, {"DETSERVE_ADMIN_KEY_FILE": str(key_file)})
    assert proc.returncode == 0, _output(proc)
    assert f"KEY={KEY}" in proc.stderr and KEY not in proc.stdout


def test_entrypoint_refuses_a_bucket_url(tmp_path: Path) -> None:
    proc = _entrypoint(tmp_path, {"DETSERVE_ADMIN_KEY": KEY, "DETSERVE_MODEL_REPOSITORY": "s3://bucket/models"})
    assert proc.returncode == 64 and "local directory" in proc.stderr, _output(proc)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DETSERVE_ADMIN_KEY": "short"},
        {"DETSERVE_ADMIN_KEY": "<replace with: openssl rand -hex 32>"},
        {"DETSERVE_ADMIN_KEY_FILE": "/nonexistent/admin-key"},
    ],
    ids=["unset", "too-short", "template-placeholder", "missing-file"],
)
def test_entrypoint_refuses_to_start_without_a_usable_key(tmp_path: Path, env: dict[str, str]) -> None:
    proc = _entrypoint(tmp_path, env)
    assert proc.returncode == 64, _output(proc)
    assert "serve" not in proc.stdout  # detserve never ran
    assert "DETSERVE_ADMIN_KEY" in proc.stderr


def test_entrypoint_runs_other_commands(tmp_path: Path) -> None:
    proc = _entrypoint(tmp_path, {}, "echo", "hello")
    assert proc.returncode == 0 and proc.stdout == "hello\n", _output(proc)


# --- names shared between files ------------------------------------------------------------------


def _k8s(kind: str, name: str | None = None) -> dict:
    docs = [d for p in _manifests() for d in _load_yaml(p) if d["kind"] == kind]
    docs = [d for d in docs if name is None or d["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def test_kubernetes_names_agree() -> None:
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]
    triton = next(c for c in pod["spec"]["containers"] if c["name"] == "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in triton["volumeMounts"]

    key_ref = next(e for e in triton["env"] if e["name"] == "DETSERVE_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
    secret = _k8s("Secret", key_ref["name"])
    assert key_ref["key"] in secret["stringData"]

    hpa = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(_k8s("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])["rules"]
    assert metric in [r["name"]["as"] for r in rules]


def test_queue_time_rule_is_the_same_in_prometheus_and_the_adapter() -> None:
    # the HPA's metric (adapter) and the alert (Prometheus rules) measure the same thing
    yaml = pytest.importorskip("yaml")
    adapter = yaml.safe_load(_k8s("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])["rules"][0]["metricsQuery"]
    rules = _load_yaml(ROOT / "docker" / "prometheus-rules.yml")[0]["groups"][0]["rules"]
    recorded = next(r["expr"] for r in rules if r["record"] == "detserve:queue_time_per_request_us:rate1m")

    def selectors(expr: str) -> list[tuple[str, str]]:
        return re.findall(r"rate\((nv_inference_[a-z_]+)\{[^}]*?(model[!=]~\"[^\"]+\")\}\[1m\]\)", expr)

    assert (
        selectors(adapter)
        == selectors(recorded)
        == [
            ("nv_inference_queue_duration_us", 'model=~".+_(preprocess|core|postprocess)"'),
            ("nv_inference_request_success", 'model!~".+_(preprocess|core|postprocess)"'),
        ]
    )


def test_compose() -> None:
    services = _load_yaml(COMPOSE)[0]["services"]
    assert {"triton", "prometheus", "locust"} <= set(services)
    triton = services["triton"]
    assert triton["shm_size"] and triton["healthcheck"]["test"]
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["locust"]["profiles"] == ["loadtest"]
    assert "triton:8001" in services["locust"]["command"]
    scrape = _load_yaml(ROOT / "docker" / "prometheus.yml")[0]["scrape_configs"]
    assert ["triton:8002"] in [t["targets"] for job in scrape for t in job["static_configs"]]


# --- rollouts on Kubernetes: the shared repository, discovery, the promote Job -------------------

PLACEHOLDERS = {"MODEL": "ssdlite", "VERSION": "2", "CANARY": "1"}


def _claims(pod_spec: dict) -> dict[str, str]:
    """volume name -> PersistentVolumeClaim name."""
    return {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _promote_args(values: dict[str, str]) -> tuple[list[str], dict]:
    """The promote container's arguments with the placeholders replaced as the runbook's sed does, and the container."""
    job = _k8s("Job", "detserve-promote")
    container = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "promote")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name, value in values.items():
        env = {k: v.replace(f"@{name}@", value) for k, v in env.items()}
    # the kubelet expands $(VAR) in args from the container's env
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]], container


def _parse_promote(args: list[str]) -> dict:
    """What the real CLI makes of the arguments (option parsing and types; nothing runs)."""
    import typer

    from detserve.app.cli import app

    assert args[0] == "promote"
    command = typer.main.get_command(app).commands["promote"]  # type: ignore[attr-defined]
    return dict(command.make_context("promote", list(args[1:])).params)


def test_the_promote_job_discovers_every_ready_pod_and_writes_the_shared_repository() -> None:
    job = _k8s("Job", "detserve-promote")
    assert job["spec"]["backoffLimit"] == 0  # a rejected canary is not staged again by a retry
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    args, container = _promote_args(PLACEHOLDERS)
    assert container["command"] == ["detserve"]
    assert container["image"] == next(c for c in _k8s("Deployment")["spec"]["template"]["spec"]["containers"])["image"]
    params = _parse_promote(args)
    assert (params["name"], params["version"], params["canary"], params["watch"]) == ("ssdlite", 2, 1, "5m")

    # --discover names the headless Service at its gRPC port; it lists ready pods of the Deployment only
    host, port = params["discover"].rsplit(":", 1)
    headless = _k8s("Service", host)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    assert {"name": "grpc", "port": int(port)}.items() <= headless["spec"]["ports"][0].items()
    deployment = _k8s("Deployment")["spec"]["template"]
    assert _selects(headless["spec"]["selector"], deployment["metadata"]["labels"])
    # ... and not the Job's own pod, nor would the PDB count it
    for selector in (headless["spec"]["selector"], _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert not _selects(selector, job["spec"]["template"]["metadata"]["labels"])

    # --repository is the Deployment's volume: the same ReadWriteMany claim, read-write here, read-only in pods
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(params["repository"]))
    assert not mount.get("readOnly", False)
    claim = _claims(pod)[mount["name"]]
    served = _claims(deployment["spec"])
    assert list(served.values()) == [claim]
    triton = next(c for c in deployment["spec"]["containers"] if c["name"] == "triton")
    assert next(m for m in triton["volumeMounts"] if m["name"] in served)["readOnly"] is True
    assert "ReadWriteMany" in _k8s("PersistentVolumeClaim", claim)["spec"]["accessModes"]


def test_the_promote_job_reads_the_admin_key_from_the_secret_as_a_0600_file(tmp_path: Path) -> None:
    job = _k8s("Job", "detserve-promote")
    pod = job["spec"]["template"]["spec"]
    _, container = _promote_args(PLACEHOLDERS)
    env = {e["name"]: e for e in container["env"]}
    assert "DETSERVE_ADMIN_KEY" not in env and not any("valueFrom" in e for e in env.values())
    key_file = Path(env["DETSERVE_ADMIN_KEY_FILE"]["value"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent))
    assert volumes[key_mount["name"]]["emptyDir"]["medium"] == "Memory"

    # the init step copies the Secret's key there with mode 0600 (a Secret volume under fsGroup is 0440)
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["install", "-m", "0600"] and init["command"][-1] == str(key_file)
    source = Path(init["command"][-2])
    secret_mount = next(m for m in init["volumeMounts"] if m["mountPath"] == str(source.parent))
    secret_volume = volumes[secret_mount["name"]]["secret"]
    (item,) = secret_volume["items"]
    assert item["path"] == source.name
    template = _k8s("Secret", secret_volume["secretName"])  # the same Secret and key the pods read
    assert item["key"] in template["stringData"]
    triton = next(c for c in _k8s("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    pods_ref = next(e for e in triton["env"] if e["name"] == "DETSERVE_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
    assert (pods_ref["name"], pods_ref["key"]) == (secret_volume["secretName"], item["key"])

    # why the copy: detserve refuses the Secret volume's 0440 and reads the copy's 0600
    from detserve.ops.admin import AdminKeyError, admin_key

    path = tmp_path / "admin-key"
    path.write_text(KEY + "\n")
    env_for = {"DETSERVE_ADMIN_KEY": "", "DETSERVE_ADMIN_KEY_FILE": str(path)}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env_for.items():
            mp.setenv(name, value)
        path.chmod(0o440)
        with pytest.raises(AdminKeyError, match="readable or writable by group"):
            admin_key()
        path.chmod(0o600)
        assert admin_key() == KEY


@pytest.mark.parametrize("left", ["VERSION", "CANARY"])
def test_a_placeholder_left_in_the_promote_job_is_refused_before_anything_runs(left: str) -> None:
    import typer

    args, _ = _promote_args({k: v for k, v in PLACEHOLDERS.items() if k != left})
    with pytest.raises(typer.BadParameter, match="integer"):
        _parse_promote(args)


def test_the_seed_job_fills_the_pods_repository_with_the_only_cloud_role() -> None:
    job = _k8s("Job", "detserve-seed-repository")
    pod = job["spec"]["template"]["spec"]
    (seed,) = pod["containers"]
    served = _claims(_k8s("Deployment")["spec"]["template"]["spec"])
    mount = next(m for m in seed["volumeMounts"] if m["mountPath"] == "/models")
    assert _claims(pod)[mount["name"]] in served.values() and not mount.get("readOnly", False)
    assert "MODEL_REPOSITORY_URI" in _k8s("ConfigMap", "detserve-config")["data"]
    role = "eks.amazonaws.com/role-arn"
    assert role in _k8s("ServiceAccount", pod["serviceAccountName"])["metadata"]["annotations"]
    # the serving pods and the promote Job hold no cloud credentials
    for sa in {_k8s("Deployment")["spec"]["template"]["spec"]["serviceAccountName"], "detserve"}:
        assert role not in _k8s("ServiceAccount", sa)["metadata"].get("annotations", {})
    assert _k8s("Job", "detserve-promote")["spec"]["template"]["spec"]["serviceAccountName"] == "detserve"
