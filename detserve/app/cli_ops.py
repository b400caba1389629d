"""``detserve`` commands that operate a running server: models, promote, rollback, status, ops-report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from detserve.app.cli_base import URL, app, load_window, seconds, terminate_as_interrupt, user_errors

if TYPE_CHECKING:
    from detserve.ops.fleet import Target
    from detserve.ops.status import ModelStatus, ServerStatus
    from detserve.ops.versions import Rollout

# several machines (ops/endpoints.py); the help says both syntaxes
ENDPOINTS_HELP = "several servers instead of --url: HOST:PORT,HOST:PORT (gRPC), or @FILE with one HOST:PORT a line (# comments)"
DISCOVER_HELP = "several servers instead of --url: every A/AAAA address of NAME (a Kubernetes headless Service), at PORT"
Endpoints = Annotated[str | None, typer.Option(help=ENDPOINTS_HELP, metavar="H:P,H:P|@FILE")]
Discover = Annotated[str | None, typer.Option(help=DISCOVER_HELP, metavar="NAME:PORT")]

models_app = typer.Typer(no_args_is_help=True, help="List, load and unload the models of a running server.")
app.add_typer(models_app, name="models")


@models_app.command("list")
@user_errors
def models_list(
    url: URL = "127.0.0.1:8001",
    repository: Annotated[Path | None, typer.Option(help="repository directory: adds each version's build record")] = None,
    endpoints: Endpoints = None,
    discover: Discover = None,
) -> None:
    """Each model version and its state (with the admin key: each replica's repository index; else readiness per model)."""
    from detserve.ops.admin import admin_key
    from detserve.ops.endpoints import endpoint_urls, models_at
    from detserve.ops.status import list_models, model_disagreements

    urls = endpoint_urls(endpoints, discover)
    rows = list_models(url, admin_key(), repository) if urls is None else models_at(urls, admin_key(), repository)
    if not rows:
        typer.echo("no models")
    where = None
    for row in rows:
        if row.where != where and row.where:
            typer.echo(f"{row.where}:")
        where = row.where
        reason = f" ({row.reason})" if row.reason else ""
        typer.echo(f"{'  ' if where else ''}{row.name:<32} version {row.version or '-':<4} {row.state}{reason}")
        b = row.build
        if b is not None:
            verified = {True: "ok", False: "FAILED", None: "not run"}[b.verified]
            typer.echo(
                f"    {b.detector}, weights {b.weights}, checkpoint sha256 {b.checkpoint_sha256 or '-'}, "
                f"{b.precision}, verification {verified}, built {b.built_at}"
            )
    _say_disagreements(model_disagreements(rows))


def _fleet(endpoints: str | None, discover: str | None, key: str | None) -> list[Target] | None:
    """The targets of --endpoints/--discover (every replica of every endpoint), or None: --url."""
    from detserve.ops.endpoints import endpoint_urls, fleet_of

    urls = endpoint_urls(endpoints, discover)
    return None if urls is None else fleet_of(urls, key)


def _say_disagreements(lines: list[str]) -> None:
    if lines:
        typer.secho("replicas disagree:\n" + "\n".join(f"  {line}" for line in lines), fg=typer.colors.YELLOW)


def _admin_call(action: str, name: str, url: str) -> None:
    """On every replica behind ``url`` (one after the other): a replica left out would serve something else."""
    from detserve.ops.admin import admin_key
    from detserve.ops.fleet import admins, targets

    key = admin_key()
    fleet = targets(url, key)
    with admins(fleet, key) as conns:
        for target, admin in zip(fleet, conns, strict=True):
            getattr(admin, f"{action}_model")(name)
            if len(fleet) > 1:
                typer.echo(f"{target.label}: {action}ed {name}")


@models_app.command("load")
@user_errors
def models_load(name: Annotated[str, typer.Argument(help="model name")], url: URL = "127.0.0.1:8001") -> None:
    """Load (or reload) a model from the server's repository; needs DETSERVE_ADMIN_KEY."""
    _admin_call("load", name, url)
    typer.echo(f"loaded {name}")


@models_app.command("unload")
@user_errors
def models_unload(name: Annotated[str, typer.Argument(help="model name")], url: URL = "127.0.0.1:8001") -> None:
    """Unload a model (in-flight requests finish first); needs DETSERVE_ADMIN_KEY."""
    _admin_call("unload", name, url)
    typer.echo(f"unloaded {name}")


@app.command()
@user_errors
def promote(
    name: Annotated[str, typer.Argument(help="ensemble name")],
    version: Annotated[int, typer.Option(help="version of the composing models to serve")],
    force: Annotated[bool, typer.Option(help="serve it even though its build record says verification failed")] = False,
    repository: Annotated[Path, typer.Option(help="the server's model repository")] = Path("model_repository"),
    url: URL = "127.0.0.1:8001",
    endpoints: Endpoints = None,
    discover: Discover = None,
    canary: Annotated[int, typer.Option(help="switch this many replicas/endpoints first; the rest only if not worse")] = 0,
    watch: Annotated[str, typer.Option(help="with --canary: how long to compare (e.g. 5m)")] = "5m",
    max_failure_increase: Annotated[float, typer.Option(help="canary: failure ratio above the rest's, absolute")] = 0.01,
    max_p99_ratio: Annotated[float, typer.Option(help="canary: p99 per request up to this times the rest's ...")] = 1.5,
    p99_slack_ms: Annotated[float, typer.Option(help="... plus this")] = 50.0,
    max_detections_drop: Annotated[float, typer.Option(help="canary: mean detections per probe image down by this share")] = 0.5,
) -> None:
    """Switch a running ensemble to another version without dropping a request; needs DETSERVE_ADMIN_KEY.

    With --endpoints/--discover: on every replica of every endpoint, in phases (load beside everywhere,
    switch one at a time, narrow everywhere); an endpoint that fails before the switch stops it with the
    old version serving everywhere (exit 1, naming it).
    """
    from detserve.ops.admin import admin_key
    from detserve.ops.versions import promote as do_promote

    terminate_as_interrupt()
    key = admin_key()
    fleet = _fleet(endpoints, discover, key)
    if canary:  # K targets first, then a verdict from their metrics and a probe set (ops/canary.py)
        from detserve.ops.canary import Thresholds, run_canary

        limits = Thresholds(max_failure_increase, max_p99_ratio, p99_slack_ms, max_detections_drop)
        c = run_canary(url, key, repository, name, version, canary, seconds(watch), limits, force, typer.echo, fleet)
        _say_switch(c.rollout)
        typer.echo(f"{name}: serving version {version} (was {c.rollout.old}); the canary was not worse")
        return
    r = do_promote(url, key, repository, name, version, force, on_step=typer.echo, fleet=fleet)
    _say_switch(r)
    typer.echo(f"{name}: serving version {r.new} (was {r.old}){' (forced)' if r.forced else ''}")


def _say_switch(r: Rollout) -> None:
    if len(r.served_before) > 1:
        before = ", ".join(f"{label} {version}" for label, version in r.served_before)
        what = "servers" if any(":" in label for label, _ in r.served_before) else "replicas"  # endpoints' labels: H:P
        typer.echo(f"{len(r.served_before)} {what} switched within {r.switch_window_s:.2f} s (were serving: {before})")


@app.command()
@user_errors
def rollback(
    name: Annotated[str, typer.Argument(help="ensemble name")],
    repository: Annotated[Path, typer.Option(help="the server's model repository")] = Path("model_repository"),
    url: URL = "127.0.0.1:8001",
    endpoints: Endpoints = None,
    discover: Discover = None,
) -> None:
    """Serve the version the last promote came from (rollout.json); needs DETSERVE_ADMIN_KEY (--endpoints: as promote)."""
    from detserve.ops.admin import admin_key
    from detserve.ops.versions import rollback as do_rollback

    terminate_as_interrupt()
    key = admin_key()
    r = do_rollback(url, key, repository, name, on_step=typer.echo, fleet=_fleet(endpoints, discover, key))
    _say_switch(r)
    typer.echo(f"{name}: serving version {r.new} (was {r.old})")


@app.command()
@user_errors
def status(
    url: URL = "127.0.0.1:8001",
    metrics_url: Annotated[
        str | None, typer.Option(help="Triton's Prometheus endpoint (default: the one the server names)")
    ] = None,
    endpoints: Endpoints = None,
    discover: Discover = None,
) -> None:
    """Readiness of the server (each replica, with the admin key) and each model, with Triton's counters per model since it loaded.

    With --endpoints/--discover: every endpoint (exit 1 if one does not answer).
    """
    from detserve.ops.admin import admin_key
    from detserve.ops.endpoints import endpoint_urls, status_at
    from detserve.ops.status import server_status

    urls = endpoint_urls(endpoints, discover)
    if urls is None:
        fleet = server_status(url, metrics_url, admin_key())
        _server_tables(fleet.servers)
        if fleet.note:
            typer.echo(fleet.note)
        _say_disagreements(fleet.disagreements)
        return
    found = status_at(urls, admin_key())
    for f in found.answered:
        _server_tables(f.servers)
        if f.note:
            typer.echo(f.note)
    for line in found.unreachable:
        typer.secho(f"server {line}", fg=typer.colors.RED, err=True)
    _say_disagreements(found.disagreements)
    if found.unreachable:
        raise typer.Exit(1)


def _server_tables(servers: list[ServerStatus]) -> None:
    for st in servers:
        where = f" {st.where}" if st.where else ""
        live, ready = ("yes" if x else "no" for x in (st.live, st.ready))
        typer.echo(f"server {st.url}{where}: live {live}, ready {ready}, metrics {st.metrics_url or '-'}")
        if st.not_ready_reason:
            typer.echo(f"  {st.not_ready_reason}")
        _status_table(st.models)
        if st.metrics_error:
            typer.echo(f"pending requests unavailable: {st.metrics_error}", err=True)


def _status_table(models: list[ModelStatus]) -> None:
    typer.echo(
        f"{'model':<32} {'ver':>3} {'ready':>5} {'ok':>8} {'failed':>7} {'queue ms':>9} {'compute ms':>10} {'batch':>6} {'pending':>7}"
    )
    for m in models:
        pending = "-" if m.pending is None else str(m.pending)
        typer.echo(
            f"{m.name:<32} {m.version:>3} {'yes' if m.ready else 'no':>5} {m.requests:>8} {m.failures:>7} "
            f"{m.queue_ms:>9.2f} {m.compute_ms:>10.2f} {m.avg_batch_size:>6.2f} {pending:>7}"
        )


@app.command("ops-report")
@user_errors
def ops_report(
    work: Annotated[Path, typer.Option(help="work directory: small repositories built once, one copy per scenario")] = Path(
        "out/ops/work"
    ),
    out: Annotated[Path, typer.Option(help="where ops-report.md and ops-report.json go")] = Path("out/ops"),
    users: Annotated[int, typer.Option(help="concurrent clients held during each fault")] = 4,
    duration: Annotated[str, typer.Option(help="load per scenario, e.g. 10s")] = "10s",
    soak: Annotated[
        str | None, typer.Option(help="instead: a soak of this length (e.g. 30m) on `detserve serve`, faults on a schedule")
    ] = None,
) -> None:
    """Inject each fault and bad input with traffic flowing and count lost requests (must be 0); exit 1 if any was lost."""
    terminate_as_interrupt()
    from loadtest.opsreport import run_ops_report

    if soak is not None:
        _soak(work, out, users, seconds(soak))
        return
    md, lost = run_ops_report(work, out, typer.echo, users=users, duration_s=load_window(users, duration))
    typer.echo(md.read_text())
    if lost:
        typer.secho(f"{lost} request(s) lost", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _soak(work: Path, out: Path, users: int, seconds: float) -> None:
    from loadtest.soak import run_soak

    md, problems = run_soak(work, out, seconds, users=users, echo=typer.echo)
    typer.echo(md.read_text())
    if problems:
        typer.secho("soak failed:\n" + "\n".join(f"- {p}" for p in problems), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
