"""Command line: `fhir-crs grade PATH...` (offline). Parses flags, calls the pipeline, renders;
maps the `FhirCrsError` tree to one-line messages and exit codes (errors.py)."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console

from . import __version__
from .errors import EXIT_CODES, FhirCrsError, GradingError
from .logs import redact, setup_logging
from .mapping_files import default_mappings_dir, load_code_map
from .render import make_console
from .settings import load_settings

log = logging.getLogger("fhir_crs.cli")


def _exit_code_help() -> str:
    return "\b\nExit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES)


def _wants(argv: list[str], *names: str) -> bool:
    """Whether a flag was given anywhere on the command line (before a `--`)."""
    args = argv[:argv.index("--")] if "--" in argv else argv
    return any(a in names for a in args)


def _json_error(code: str, message: str, exit_code: int) -> None:
    """With --json, the error is also one JSON object on stdout, for automation."""
    sys.stdout.buffer.write(orjson.dumps({"error": {"code": code, "message": message, "exit": exit_code}}) + b"\n")
    sys.stdout.flush()


class CrsGroup(click.Group):
    """Click group with one central error handler: one line on stderr (a traceback only with -v,
    given before or after the subcommand), and with --json also `{"error": {...}}` on stdout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["fhir_crs.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        argv = ctx.meta.get("fhir_crs.argv", [])
        verbose = bool(ctx.params.get("verbose")) or _wants(argv, "-v", "--verbose")
        as_json = _wants(argv, "--json")
        setup_logging(verbose)
        try:
            return super().invoke(ctx)
        except FhirCrsError as exc:
            if verbose:
                click.echo(redact(traceback.format_exc()).rstrip(), err=True)
            click.echo(f"fhir-crs: error: {redact(str(exc))}", err=True)
            if as_json:
                _json_error(exc.code, redact(str(exc)), exc.exit_code)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            if as_json:
                _json_error("usage", exc.format_message(), exc.exit_code)
            raise
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug: one line, the traceback only with -v
            if verbose:
                click.echo(redact(traceback.format_exc()).rstrip(), err=True)
            message = redact(f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; -v shows the traceback)")
            click.echo(f"fhir-crs: error: {message}", err=True)
            if as_json:
                _json_error(GradingError.code, message, GradingError.exit_code)
            ctx.exit(GradingError.exit_code)


def verbose_option(f: Any) -> Any:
    """`-v` after the subcommand too (the group's handler reads it from the command line)."""
    return click.option("-v", "--verbose", is_flag=True, expose_value=False,
                        help="Show tracebacks on errors and debug log lines.")(f)


def mapping_options(f: Any) -> Any:
    f = click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
                     help="Override a grading convention (see mappings/grading.toml).")(f)
    f = click.option("--mappings", "mappings_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Folder of site mapping tables (default: the tables shipped with fhir-crs, or $FHIR_CRS_MAPPINGS).")(f)
    return verbose_option(f)


@click.group(cls=CrsGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_exit_code_help())
@click.version_option(__version__, "-V", "--version", prog_name="fhir-crs")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors and debug log lines.")
def cli(verbose: bool) -> None:
    """fhir-crs: grade CAR-T cytokine release syndrome (CRS) and ICANS from FHIR R4 data.

    \b
    Example:
      fhir-crs grade fixtures/R4/vignettes --json
    """


def check_output(path: str | Path, what: str) -> None:
    """An output file path that cannot be written is one clear error (exit 3), found before any work."""
    from .errors import OutputError

    target = Path(path)
    if str(path).endswith(("/", "\\")) or target.is_dir():
        example = "report.csv" if what == "--csv" else "cibmtr-4100.csv"
        raise OutputError(f"{what} {path} is a folder: give a file name (e.g. {target / example}).")
    if not target.parent.is_dir():
        raise OutputError(f"{what} {path}: folder {target.parent} does not exist.")


def write_output(path: str | Path, text: str, what: str) -> None:
    from .errors import OutputError
    from .private import write_private_text

    check_output(path, what)
    try:
        write_private_text(Path(path), text)  # owner-only: the report names patients
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write: {exc.strerror or exc}.") from exc


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the grade contract).")
@click.option("--show-skips", is_flag=True, help="List every skipped resource with its reason.")
@click.option("--strict", is_flag=True, help="Exit 7 if a resource of a type fhir-crs grades was skipped (an Encounter or a Claim does not count).")
@click.option("--series", is_flag=True, help="With --json: add the plotted time series of each case.")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: this process. spark: Apache Spark (pip install 'fhir-crs[spark]', Java 17), same results.")
@click.option("--master", default=None, metavar="URL",
              help="--engine spark: the Spark master (local[2], spark://host:7077, yarn; default local[*] or spark-submit's).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="--engine spark: write the cases and skipped.ndjson (or Parquet) to this new or empty folder.")
@click.option("--format", "out_format", type=click.Choice(["json", "parquet"]), default="json", show_default=True,
              help="--out: one JSON line per case (cases.ndjson), or Parquet (cases.parquet/, skipped.parquet/).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="--engine local: processes that read, map and grade (default: the machine's cores); the output is the same for any number.")
@mapping_options
def grade(paths: tuple[Path, ...], as_json: bool, show_skips: bool, strict: bool, series: bool, workers: int | None,
          engine: str, master: str | None, out_dir: Path | None, out_format: str,
          mappings_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Grade CRS/ICANS from FHIR R4 files, folders, Bundles or NDJSON, with no server.

    \b
    Reads every *.json / *.ndjson under the given paths, maps Observations,
    MedicationAdministrations, Procedures and Patients through mappings/*.toml, builds one
    case per CAR-T infusion (day 0) and grades it.
    \b
    Example:
      fhir-crs grade fixtures/R4/vignettes/V06.json
      fhir-crs grade export/ --json > grades.json
    """
    from .parallel import default_workers
    from .pipeline import run_paths, stream_grade

    if series and not as_json and out_dir is None:
        raise click.UsageError("--series needs --json (the plotted series are part of the JSON output).")
    if engine == "local" and (master or out_dir or out_format != "json"):
        raise click.UsageError("--master, --out and --format need --engine spark.")
    if out_dir is not None and as_json:
        raise click.UsageError("--out and --json are exclusive: --out writes files, --json prints one object.")
    if engine == "spark" and workers is not None:
        raise click.UsageError("--workers is for --engine local (Spark's parallelism is --master, e.g. local[2]).")
    settings = load_settings(mappings_dir or default_mappings_dir(), list(overrides))
    workers = workers or default_workers()
    if engine == "spark":
        codes = _grade_spark([str(p) for p in paths], settings, mappings_dir, as_json, show_skips, series, master, out_dir, out_format)
    elif as_json:
        # flat memory: events spill to patient partitions on disk, the JSON is streamed
        codes = stream_grade(list(paths), sys.stdout.buffer, settings, mappings_dir, series, workers).skip_codes
    else:
        if workers > 1:  # the same object as run_paths(...).to_json(), graded on `workers` processes
            import io

            buf = io.BytesIO()
            stream_grade(list(paths), buf, settings, mappings_dir, series, workers)
            data = orjson.loads(buf.getvalue())
        else:
            data = run_paths(list(paths), settings, mappings_dir).to_json(series=series)
        render_out(data, show_skips)
        codes = [s["code"] for s in data["skipped"]]
    if strict:
        from .events import NOT_A_DATA_PROBLEM

        counted = [c for c in codes if c not in NOT_A_DATA_PROBLEM]
        if counted:
            click.echo(f"fhir-crs: {len(counted)} resource(s) of types fhir-crs grades skipped (--strict)", err=True)
            sys.exit(7)


def _grade_spark(paths: list[str], settings: Any, mappings_dir: Path | None, as_json: bool, show_skips: bool,
                 series: bool, master: str | None, out_dir: Path | None, out_format: str) -> list[str]:
    """`grade --engine spark`: the same core per patient in Spark executors (spark.py)."""
    from . import spark as engine

    code_map = load_code_map(mappings_dir)
    engine.plan_reads(paths)  # a missing input path: one line, before Spark starts
    tmp = engine.prepare_out_dir(out_dir) if out_dir is not None else None
    try:
        session, started = engine.session(master)
    except BaseException:
        if tmp is not None:
            tmp.rmdir()
        raise
    try:
        render = "contract" if as_json else ("parquet" if out_format == "parquet" else "line")
        run = engine.grade_spark(session, paths, code_map, settings, render=render, series=series)
        if as_json:
            engine.write_contract(run, sys.stdout.buffer, settings)
        elif out_dir is not None and tmp is not None:
            summary = engine.write_out_dir(run, session, tmp, out_dir, out_format, settings)
            click.echo(f"fhir-crs: {summary['cases']} case(s), {summary['skipped']} skip(s), "
                       f"{summary['resources_read']} resource(s) read -> {out_dir}", err=True)
            tmp = None
        else:
            data = {"cases": [orjson.loads(c) for c in run.sorted_cases()], "skipped": list(run.sorted_skips()),
                    "resources_read": run.resources_read, "resources_used": run.resources_read - run.skipped,
                    "settings": settings.as_dict()}
            render_out(data, show_skips)
        run.rdd.unpersist()
        return [c for c, n in run.skip_codes.items() for _ in range(n)]
    finally:
        if tmp is not None and tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        if started:
            session.stop()


def render_out(data: dict[str, Any], show_skips: bool) -> None:
    from .render import render_run

    render_run(data, make_console(), show_skips)


def main() -> None:
    cli(prog_name="fhir-crs")


def server_options(f: Any) -> Any:
    """Options shared by the commands that talk to a FHIR server (values None = not given)."""
    opts = [
        click.option("--server", default=None, metavar="URL", help="FHIR R4 base URL (env FHIR_CRS_SERVER)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Settings file (default ./fhir-crs.toml or $FHIR_CRS_CONFIG)."),
        click.option("--auth", type=click.Choice(["none", "bearer", "basic", "smart"]), default=None,
                     help="Authentication (secrets only from env or files: FHIR_CRS_TOKEN, --token-file …)."),
        click.option("--token-file", default=None, type=click.Path(dir_okay=False), help="File holding the bearer token."),
        click.option("--timeout", type=float, default=None, help="Seconds per request."),
        click.option("--allow-insecure-http", is_flag=True, expose_value=False, callback=_security_flag,
                     help="Accept a plain http:// server that is not on loopback (refused by default)."),
        click.option("--log-redact/--no-log-redact", default=None, expose_value=False, callback=_security_flag,
                     help="Replace patient ids in log lines with a stable keyed hash (default: on for sync)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _security_flag(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Security flags of every server command go straight into the run settings (ctx.meta)."""
    if value:
        ctx.meta.setdefault("fhir_crs_flags", {})[param.name] = True
    elif value is False:
        ctx.meta.setdefault("fhir_crs_flags", {})[param.name] = False


def run_config(ctx_flags: dict[str, Any], config_path: Path | None) -> Any:
    import os

    from .config import resolve
    from .logs import set_patient_redaction

    ctx = click.get_current_context()
    flags = {**{k: v for k, v in ctx_flags.items() if v is not None}, **ctx.meta.get("fhir_crs_flags", {})}
    cfg = resolve(flags, os.environ, config_path, Path.cwd())
    hashing = cfg.log_redact if cfg.log_redact is not None else ctx.info_name == "sync"
    if hashing:
        # the key lives beside the state store; a dry run writes nothing, so it hashes with a
        # key of its own when there is none yet
        set_patient_redaction(True, key_folder=log_key_folder(cfg), create_key=not ctx.params.get("dry_run"))
    else:
        set_patient_redaction(False)
    return cfg


def log_key_folder(cfg: Any) -> Path:
    """The folder of the log-hash key (`log-key`): the folder of the run's sync state store
    (`state_path`, else the per-user default), for every command that hashes patient ids and for
    `fhir-crs log-hash`, so both always use the same key."""
    from .sync import default_state_path

    state = Path(cfg.state_path).expanduser() if cfg.state_path else default_state_path()
    return state.parent


def valid_patient_id(value: str) -> str:
    """A FHIR logical id (`Patient/` prefix tolerated), checked before any request is sent."""
    from .mappers.common import SAFE_ID

    pid = value.strip().removeprefix("Patient/")
    if not pid:
        raise click.BadParameter("is empty: give the logical id of the Patient on the server (e.g. --patient 123).",
                                 param_hint="'--patient'")
    if not SAFE_ID.match(pid):
        raise click.BadParameter(f"{value!r} is not a FHIR logical id (1-64 of A-Z a-z 0-9 - .).", param_hint="'--patient'")
    return pid


def valid_instant(value: str | None, flag: str) -> str | None:
    """An ISO 8601 date/time for a server search parameter, checked locally (no request sent)."""
    from .mappers.common import parse_datetime

    if value is None:
        return None
    when = parse_datetime(value)
    if when is None:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or date-time (e.g. 2026-12-02 or 2026-12-02T22:00:00Z).",
                                 param_hint=f"'{flag}'")
    return value.strip()


def make_client(cfg: Any) -> Any:
    """The FHIR client for a resolved RunConfig (auth from env/files, never from flags' values)."""
    from .errors import ConfigError
    from .fhir import BasicAuth, BearerAuth, FhirClient, NoAuth

    if not cfg.server:
        raise ConfigError("no FHIR server configured: pass --server URL, set FHIR_CRS_SERVER, or add 'server' to fhir-crs.toml.")
    if cfg.auth == "bearer":
        token = cfg.secret_token()
        if not token:
            raise ConfigError("auth 'bearer' needs a token: set FHIR_CRS_TOKEN or token_file.")
        auth: Any = BearerAuth(token)
    elif cfg.auth == "basic":
        password = cfg.secret_password()
        if not cfg.username or not password:
            raise ConfigError("auth 'basic' needs username and FHIR_CRS_PASSWORD (or password_file).")
        auth = BasicAuth(cfg.username, password)
    else:
        auth = NoAuth()
    client = FhirClient(cfg.server, auth=auth, timeout=cfg.timeout, page_size=cfg.page_size,
                        max_retries=cfg.max_retries, total_time_cap=cfg.total_time_cap,
                        max_pages=cfg.max_pages, max_response_bytes=int(cfg.max_response_mb * 1024 * 1024),
                        allow_insecure_http=cfg.allow_insecure_http, ca_bundle=cfg.ca_bundle,
                        credential_origins=cfg.bulk_file_origins)
    if cfg.auth == "smart":
        from .fhir.smart import smart_auth_from_config

        # discovery and token requests go through this client (same TLS, caps and origin rules)
        client.auth = smart_auth_from_config(cfg, client)
    return client


@cli.command()
@click.option("--patient", "patient_id", required=True, metavar="ID", help="Logical id of the Patient on the server.")
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the same object as `fhir-crs grade --json`.")
@click.option("--write/--no-write", default=None, help="Write the Condition(s) and summary Bundle back (default: no-write).")
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
@click.option("--allow-convention-change", is_flag=True,
              help="Overwrite a stored Condition that was graded with other settings or mapping tables (refused otherwise, exit 9).")
@click.option("--show-skips", is_flag=True, help="List every skipped resource with its reason.")
@mapping_options
def pull(patient_id: str, server: str | None, config_path: Path | None, auth: str | None, token_file: str | None,
         timeout: float | None, as_json: bool, write: bool | None, dry_run: bool, allow_convention_change: bool,
         show_skips: bool, mappings_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Fetch one patient from a FHIR R4 server, grade every CAR-T infusion, optionally write back.

    \b
    Reads Patient, Procedures, MedicationAdministrations (+ Medications) and the Observations
    around each infusion; prints the timeline, the grades side by side and the skips.
    With --write it writes one CRS Condition (ICANS too when graded > 0) and a summary Bundle
    per case, idempotently, in one transaction.
    \b
    Example:
      fhir-crs pull --patient 123 --server http://127.0.0.1:8080/fhir --write
    """
    from .pipeline import pull_patient

    patient_id = valid_patient_id(patient_id)
    cfg = run_config({"server": server, "auth": auth, "token_file": token_file, "timeout": timeout,
                      "write": write, "mappings": str(mappings_dir) if mappings_dir else None}, config_path)
    settings = load_settings(Path(cfg.mappings) if cfg.mappings else default_mappings_dir(), list(overrides))
    load_code_map(Path(cfg.mappings) if cfg.mappings else None)  # bad tables: exit 2 before any request
    client = make_client(cfg)
    result = pull_patient(client, patient_id, cfg, settings, write=cfg.write and not dry_run, dry_run=dry_run,
                          allow_convention_change=allow_convention_change)
    data = result.run.to_json()
    data["written"] = [
        {"patient": w.patient, "infusion": w.infusion, "status": w.status, "resources": w.written,
         "changes": w.changes, **({"refused": w.message} if w.message else {}),
         **({"transaction": w.transaction} if w.transaction else {})}
        for w in result.writes
    ]
    data["requests"] = result.requests
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
        return
    from .render import render_timeline

    console = make_console()
    for case in data["cases"]:
        render_timeline(case, console)
    render_out(data, show_skips)
    for w in data["written"]:
        if w["status"] in ("dry-run", "refused"):
            console.print(f"[bold]Dry run[/bold] for {w['patient']} (infusion {w['infusion']}): would write "
                          "(the transaction itself: --json)", highlight=False)
            for line in would_write_lines(w["changes"]):
                console.print(f"  {line}", markup=False, highlight=False)
            if w.get("refused"):
                console.print(f"  but a real run would refuse: {w['refused']}", markup=False, highlight=False)
        else:
            what = ", ".join(f"{k}: {v}" for k, v in w["resources"].items()) or "nothing to write"
            console.print(f"Write-back {w['status']} for {w['patient']} (infusion {w['infusion']}): {what}")
    if not cfg.write and not dry_run:
        console.print("(not written: pass --write to write the Condition and summary Bundle back)")


@cli.command()
@server_options
@click.option("--patients", "patients_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with one Patient id per line (instead of discovering the cohort).")
@click.option("--group", "group_id", default=None, metavar="ID", help="Sync the members of this Group.")
@click.option("--since", default=None, metavar="ISO", help="Only patients whose data changed after this instant.")
@click.option("--bulk", is_flag=True, help="Use Bulk Data $export (Patient or Group level) instead of per-patient searches.")
@click.option("--full", is_flag=True,
              help="Re-read and re-grade every patient of the cohort (and re-discover it), ignoring the change feed; "
                   "reports what the feed had missed.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@click.option("--dry-run", is_flag=True,
              help="Grade and list what would be written (patient, resource, create/update, old -> new grade); "
                   "write nothing at all, the state store included.")
@click.option("--allow-convention-change", is_flag=True,
              help="Overwrite stored Conditions that were graded with other settings or mapping tables (refused otherwise).")
@click.option("--state", "state_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite state file (default: state.sqlite in the per-user data folder; the path is printed).")
@click.option("--lookback-days", type=float, default=None, metavar="DAYS",
              help="Cohort discovery: CAR-T administrations in the last DAYS days (default 120).")
@click.option("--workers", type=int, default=None, help="Concurrent patients (reads); writes stay serial per patient.")
@mapping_options
def sync(server: str | None, config_path: Path | None, auth: str | None, token_file: str | None, timeout: float | None,
         patients_file: Path | None, group_id: str | None, since: str | None, bulk: bool, full: bool, as_json: bool, dry_run: bool,
         allow_convention_change: bool, state_path: str | None, lookback_days: float | None, workers: int | None, mappings_dir: Path | None,
         overrides: tuple[str, ...]) -> None:
    """Nightly job: grade the CAR-T cohort of a FHIR server and write back what changed.

    \b
    Finds the cohort (CAR-T Procedures/product administrations in the look-back window, or
    --patients FILE, or --group ID), asks the server once for everything changed since the
    last successful run (type-level _history or _lastUpdated searches; local SQLite state),
    re-grades only the patients with changes or deletions and writes their Condition and
    summary Bundle back in one transaction each (with a Provenance). --full (and, every
    reconcile_days, a periodic reconciliation) re-reads everyone. Killed runs are finished by
    the next run. Ctrl-C / SIGTERM stop after the write in flight (exit
    130 / 143, the run recorded as interrupted). Exit 1 if any patient failed.
    \b
    Example:
      fhir-crs sync --server http://127.0.0.1:8080/fhir --json
    """
    from .interrupt import StopSignal
    from .sync import StateStore, Sync, default_state_path, group_members, read_patient_list, scope_of

    if patients_file and group_id:
        raise click.UsageError("--patients and --group are alternatives; give one.")
    if bulk and full:
        raise click.UsageError("--full re-reads the cohort through searches; --bulk without a stored _since exports everything.")
    since = valid_instant(since, "--since")
    cfg = run_config({"server": server, "auth": auth, "token_file": token_file, "timeout": timeout,
                      "state_path": state_path, "workers": workers, "lookback_days": lookback_days,
                      "mappings": str(mappings_dir) if mappings_dir else None}, config_path)
    settings = load_settings(Path(cfg.mappings) if cfg.mappings else default_mappings_dir(), list(overrides))
    load_code_map(Path(cfg.mappings) if cfg.mappings else None)  # bad tables: exit 2 before any request
    client = make_client(cfg)
    store_path = Path(cfg.state_path).expanduser() if cfg.state_path else default_state_path()
    state = StateStore(store_path, cfg.server, read_only=dry_run)
    log.info("sync state: %s%s", store_path, " (dry run: read only, nothing written)" if dry_run else "")
    console = make_console(stderr=True)
    stop = StopSignal()
    with stop.installed():
        try:
            if bulk:
                from .sync import run_bulk

                summary = run_bulk(client, cfg, settings, state, group_id=group_id, dry_run=dry_run, console=console,
                                   allow_convention_change=allow_convention_change, stop=stop)
            else:
                explicit = (read_patient_list(patients_file) if patients_file
                            else group_members(client, group_id) if group_id else None)
                job = Sync(client, cfg, settings, state, dry_run=dry_run, since=since, stop=stop, full=full,
                           allow_convention_change=allow_convention_change)
                summary = _run_with_progress(job, (explicit, scope_of(explicit, group_id)), console)
                if not summary.patients and not stop.is_set():
                    log.warning("%s", empty_cohort_reason(cfg, patients_file, group_id))
        finally:
            state.close()
    data = summary.to_json()
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        from .render import render_sync_summary

        out = make_console()
        render_sync_summary(data, out)
        if dry_run:
            lines = [line for w in data["would_write"] for line in would_write_lines([w], w["patient"])]
            refused = sorted({w["refused"] for w in data["would_write"] if w.get("refused")})
            out.print(f"Dry run: nothing written (server and state store); a real run would write {len(lines)} resource(s)"
                      + (":" if lines else "."), markup=False, highlight=False)
            for line in lines:
                out.print(f"  {line}", markup=False, highlight=False)
            for message in refused:
                out.print(f"  refused without --allow-convention-change: {message}", markup=False, highlight=False)
        if not data["patients"]:
            out.print(empty_cohort_reason(cfg, patients_file, group_id), markup=False, highlight=False)
        out.print(f"State file: {store_path}", markup=False, highlight=False)
    if summary.interrupted:
        click.echo(f"fhir-crs: sync interrupted by {summary.interrupted}: {summary.not_done} patient(s) not done, no write "
                   "left half-done; the run is recorded as interrupted and the next run finishes it.", err=True)
        sys.exit(stop.exit_code)
    if summary.errors:
        sys.exit(1)


def _grade(g: int | None) -> str:
    return "–" if g is None else str(g)


def would_write_lines(changes: list[dict[str, Any]], patient: str | None = None) -> list[str]:
    """One line per resource a dry run would write: create/update, resource, old -> new grade."""
    out = []
    for c in changes:
        who = f"{patient} " if patient else ""
        grade = f": ASTCT grade {_grade(c.get('old_grade'))} -> {_grade(c.get('new_grade'))}" if c.get("new_grade") is not None else ""
        out.append(f"{who}{c['action']} {c['resource']} ({c['kind']}){grade}  [{c['request']}]")
    return out


def empty_cohort_reason(cfg: Any, patients_file: Path | None, group_id: str | None) -> str:
    """Why a sync found no patient, and what to change."""
    if patients_file:
        return f"0 patients: {patients_file} lists no Patient id."
    if group_id:
        return f"0 patients: Group/{group_id} has no Patient members."
    return (f"0 patients: no CAR-T administration in the last {cfg.lookback_days:g} days on {cfg.server} "
            "(a Procedure or product MedicationAdministration coded as in the site tables): see --lookback-days, "
            "or give --patients FILE / --group ID.")


def _run_with_progress(job: Any, patients: list[str] | tuple[list[str] | None, str], console: Console) -> Any:
    """Runs a `Sync` over `patients` (or one night: (explicit cohort or None, scope)) with a
    progress bar on a terminal, plain log lines otherwise."""

    def go() -> Any:
        return job.night(*patients) if isinstance(patients, tuple) else job.run(patients)

    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("sync"), BarColumn(), MofNCompleteColumn(), TextColumn("errors: {task.fields[errors]}"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("patients", total=None, errors=0)

            def tick(patient: str, done: int, total: int, errors: int) -> None:
                bar.update(task, total=total, completed=done, errors=errors)

            job.progress = tick
            return go()

    def line(patient: str, done: int, total: int, errors: int) -> None:
        log.info("sync: %d/%d patients done, %d error(s)", done, total, errors)

    job.progress = line
    return go()


def _report_outputs(report: dict[str, Any], cases_series: list[dict[str, Any]], as_json: bool, csv_path: str | None,
                    html_dir: Path | None, cibmtr_path: str | None, console: Console) -> Path | None:
    """Writes the report in every format asked for; returns the HTML index if written."""
    from .cibmtr import cibmtr_csv, cibmtr_rows
    from .report import render_report, report_csv

    index = None
    if html_dir is not None:
        from .html import render_report_html

        index = render_report_html(report, cases_series, html_dir)
    if csv_path:
        text = report_csv(report)
        if csv_path == "-":
            sys.stdout.write(text)
        else:
            write_output(csv_path, text, "--csv")
    if cibmtr_path:
        rows = cibmtr_rows(cases_series)
        if (report.get("about") or {}).get("deidentified"):
            from .identity import patient_label

            rows = [{**r, "patient": f"Patient/~{patient_label(r['patient'])}"} for r in rows]
        write_output(cibmtr_path, cibmtr_csv(rows), "--cibmtr")
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    elif csv_path != "-":
        render_report(report, console)
        if index is not None:
            console.print(f"HTML report: {index}")
        if cibmtr_path:
            console.print(f"CIBMTR Form 4100 components: {cibmtr_path}")
    return index


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@server_options
@click.option("--patients", "patients_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With a server: one Patient id per line (default: discover the CAR-T cohort).")
@click.option("--group", "group_id", default=None, metavar="ID", help="With a server: the members of this Group.")
@click.option("--system", type=click.Choice(["astct", "lee2014", "penn", "mskcc", "cartox", "ctcae5"]), default="astct",
              show_default=True, help="CRS grading system for the any/severe rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the report object (report contract).")
@click.option("--csv", "csv_path", default=None, metavar="FILE", help="Write the table as CSV ('-' for stdout).")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a self-contained HTML report (index.html + one timeline page per patient).")
@click.option("--cibmtr", "cibmtr_path", default=None, metavar="FILE", help="Write CIBMTR Form 4100 CRS/neurotoxicity components (CSV).")
@click.option("--deidentify", is_flag=True,
              help="Hide MRN, name and FHIR ids in every output: patients appear by their stable label (P-…) only.")
@mapping_options
def report(paths: tuple[Path, ...], server: str | None, config_path: Path | None, auth: str | None, token_file: str | None,
           timeout: float | None, patients_file: Path | None, group_id: str | None, system: str, as_json: bool,
           csv_path: str | None, html_dir: Path | None, cibmtr_path: str | None, deidentify: bool,
           mappings_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Cohort report in the seed study's terms, from FHIR files or from a FHIR server.

    \b
    Rows: CRS any grade and severe (grade >= 3 under --system), haemodynamic instability,
    mechanical ventilation, neurological symptoms (ICANS > 0), liver injury (CTCAE >= 2),
    tocilizumab, corticosteroids, blood purification, deaths, recovery within 14 days — with
    counts, percentages and the patients behind each; Spearman correlation of the maximum CRS
    grade with peak IL-6 and IFN-gamma.
    \b
    Every output names the report date, the data source (files or server URL, never with
    credentials) and the fhir-crs version; patients carry a stable label derived from their
    FHIR id, with their MRN and name (hidden with --deidentify).
    \b
    Examples:
      fhir-crs report fixtures/cohort/picu --html out/report
      fhir-crs report --server http://127.0.0.1:8080/fhir --json
    """
    from .identity import ReportMeta
    from .report import report_from_cases

    if csv_path and csv_path != "-":
        check_output(csv_path, "--csv")
    if cibmtr_path:
        check_output(cibmtr_path, "--cibmtr")
    settings = load_settings(mappings_dir or default_mappings_dir(), list(overrides))
    if paths:
        from .pipeline import run_paths

        run = run_paths(list(paths), settings, mappings_dir)
        graded = run.to_json(series=True)
        cases, skipped, read = graded["cases"], graded["skipped"], run.patients
        meta = ReportMeta.for_paths(list(paths), deidentify)
    else:
        from .pipeline import pull_patient
        from .sync import select_patients

        cfg = run_config({"server": server, "auth": auth, "token_file": token_file, "timeout": timeout,
                          "mappings": str(mappings_dir) if mappings_dir else None}, config_path)
        if cfg.mappings:  # the site's folder from the config file: its grading.toml too
            settings = load_settings(Path(cfg.mappings), list(overrides))
        client = make_client(cfg)
        patients = select_patients(client, cfg, patients_file, group_id)
        cases, skipped, read = [], [], len(patients)
        for pid in patients:
            graded = pull_patient(client, pid, cfg, settings).run.to_json(series=True)
            cases.extend(graded["cases"])
            skipped.extend(graded["skipped"])
        meta = ReportMeta.for_server(cfg.server, deidentify)
    _report_outputs(report_from_cases(cases, system, meta, skipped, read), cases, as_json, csv_path, html_dir, cibmtr_path,
                    make_console())


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fhir-crs-demo"),
              show_default=True, help="Folder for the server data, state, report and HTML pages: new, empty, or one "
                                      "an earlier demo created (marker .fhir-crs-demo); a rerun replaces only what demo wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the cohort report object (report contract).")
@click.option("--seed", type=int, default=None, help="Seed of the synthetic cohort (default: the committed one).")
@click.option("--server", "server_kind", type=click.Choice(["embedded", "hapi"]), default="embedded", show_default=True,
              help="embedded: sekmet-fhir (starts in seconds); hapi: a local HAPI FHIR JPA server "
                   "(scripts/hapi-server; needs Java 17, and Maven for its first build; starts in about a minute).")
@verbose_option
def demo(out_dir: Path, as_json: bool, seed: int | None, server_kind: str) -> None:
    """The whole pipeline on a fresh machine, with no external server.

    \b
    Starts the embedded FHIR server (sekmet-fhir; with --server hapi a local HAPI FHIR JPA
    server) on 127.0.0.1, loads the synthetic 14-child
    PICU cohort shaped like the seed study, runs `sync` with write-back, prints the cohort
    report and the path of the HTML report (one timeline page per child), and stops the server.
    \b
    Example:
      fhir-crs demo --out fhir-crs-demo
      fhir-crs demo --server hapi
    """
    from .config import RunConfig
    from .fhir import FhirClient, NoAuth
    from .identity import ReportMeta
    from .localserver import HapiFhirServer, LocalFhirServer
    from .outdir import prepare_demo_dir
    from .private import private_dir
    from .report import report_from_cases
    from .sync import StateStore, Sync, discover_cohort
    from .synthetic import DEFAULT_SEED, generate_picu_cohort

    console = make_console(stderr=as_json)
    settings = load_settings(default_mappings_dir())
    prepare_demo_dir(out_dir)  # refuses a foreign non-empty folder; clears only what demo created
    private_dir(out_dir)
    bundles, _truth = generate_picu_cohort(seed if seed is not None else DEFAULT_SEED)
    if server_kind == "hapi":
        console.print("Starting a local HAPI FHIR JPA server (scripts/hapi-server; about a minute)")
    local = HapiFhirServer(out_dir / "server") if server_kind == "hapi" else LocalFhirServer(out_dir / "server")
    with local as server:
        name = "HAPI FHIR JPA" if server_kind == "hapi" else "sekmet-fhir"
        console.print(f"Local FHIR server ({name}) on {server.base}")
        client = FhirClient(server.base, auth=NoAuth(), timeout=120)
        for bundle in bundles:
            client.transaction(bundle)
        n_resources = sum(len(b["entry"]) for b in bundles)
        console.print(f"Loaded the synthetic PICU cohort: {len(bundles)} patients, {n_resources:,} resources")
        cfg = RunConfig(server=server.base, state_path=str(out_dir / "state.sqlite"), lookback_days=100000.0)
        code_map = load_code_map()
        patients = discover_cohort(client, code_map, cfg.lookback_days)
        state = StateStore(Path(cfg.state_path), server.base)
        try:
            summary = Sync(client, cfg, settings, state).run(patients)
        finally:
            state.close()
        console.print(
            f"sync: {summary.patients} patients, {summary.graded} graded, written "
            f"{summary.written.get('Condition', 0)} Conditions + {summary.written.get('Bundle', 0)} summary Bundles, "
            f"{len(summary.errors)} errors, {summary.requests} requests in {summary.seconds:.1f} s"
        )
        cases = [c.to_json(settings, series=True) for c in summary.graded_cases]
    report_obj = report_from_cases(cases, "astct", ReportMeta.for_server(server.base), [], len(patients))
    _report_outputs(report_obj, cases, as_json, str(out_dir / "report.csv"), out_dir / "report",
                    str(out_dir / "cibmtr-4100.csv"), console)
    if not as_json:
        console.print(f"Server stopped. Everything is in {out_dir}/ (report.csv, cibmtr-4100.csv, report/index.html).")
    if summary.errors:
        for e in summary.errors:
            click.echo(f"fhir-crs demo: {e['patient']}: {e['error']}", err=True)
        sys.exit(1)


@cli.command("log-hash")
@click.argument("patient_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--state", "state_path", default=None, type=click.Path(dir_okay=False),
              help="The sync state file of the run whose log you read (default: as for sync); its key sits beside it.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Settings file (default ./fhir-crs.toml or $FHIR_CRS_CONFIG), for state_path.")
@verbose_option
def log_hash(patient_ids: tuple[str, ...], state_path: str | None, config_path: Path | None) -> None:
    """Print the hash that redacted log lines show instead of a patient id.

    \b
    With --log-redact (the default for sync) a log line shows `Patient/~HASH` (or `~HASH`)
    instead of the patient id: HMAC-SHA256 of the id under this installation's key, the file
    `log-key` beside the sync state store. For each ID this prints `ID<TAB>~HASH`, so you can
    find that patient's lines. Nothing is sent or written; with no key there yet (no redacted
    run used this state folder) it exits 2. Hashes of a --dry-run without a key are not
    reproducible (that run used a key of its own).
    \b
    Example:
      fhir-crs log-hash 12345 Patient/67890
      grep -F "$(fhir-crs log-hash 12345 | cut -f2)" sync.log
    """
    import os

    from .config import resolve
    from .errors import ConfigError
    from .logs import hash_patient_id, log_key
    from .mappers.common import SAFE_ID

    ids = [value.strip().removeprefix("Patient/") for value in patient_ids]
    bad = [value for value, pid in zip(patient_ids, ids, strict=True) if not SAFE_ID.match(pid)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a FHIR logical id (1-64 of A-Z a-z 0-9 - .).", param_hint="'ID'")
    flags = {"state_path": state_path} if state_path else {}
    cfg = resolve(flags, os.environ, config_path, Path.cwd())
    folder = log_key_folder(cfg)
    key = log_key(folder, create=False)
    if key is None:
        raise ConfigError(f"no log-hash key in {folder} (log-key): no run with --log-redact has used this state "
                          "folder yet; give --state FILE of the sync whose log you read.")
    for pid in ids:
        click.echo(f"{pid}\t~{hash_patient_id(pid, key)}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--allow-fhir-server", "allow_fhir_servers", multiple=True, metavar="URL",
              help="A FHIR base URL this service may call (repeatable): a CDS Hooks fhirServer or a SMART iss. "
                   "An allow-list, never an open proxy: requests naming another server are refused, nothing fetched.")
@click.option("--server", default=None, metavar="URL",
              help="The site's FHIR server (env FHIR_CRS_SERVER), allowed like --allow-fhir-server (e.g. a loopback server).")
@click.option("--allow-ehr-origin", "ehr_origins", multiple=True, metavar="ORIGIN",
              help="Browser origin allowed to call the CDS service (CORS; repeatable), e.g. https://sandbox.cds-hooks.org.")
@click.option("--cds-client", "cds_clients", multiple=True, metavar="ISS=JWKS_URL",
              help="A CDS client (EHR) allowed to call the CDS service (repeatable): its JWT issuer and the URL of "
                   "its JWK Set. With it, every CDS Hooks call needs 'Authorization: Bearer <JWT>' signed by that EHR "
                   "(aud = --public-url + /cds-services/fhir-crs-crs-grade, exp at most 5 min, 30 s clock skew, "
                   "jti used once; jku only if it is that URL), else 401 and nothing is fetched. Needs --public-url. "
                   "Without it calls are not authenticated: put an authenticating gateway in front.")
@click.option("--smart-client-id", default="fhir-crs", show_default=True, metavar="ID",
              help="The SMART app's client id as registered at the EHR (a public client: PKCE S256, no secret).")
@click.option("--smart-v2", is_flag=True, help="Ask SMART v2 scopes (patient/*.rs) instead of v1 (patient/*.read).")
@click.option("--public-url", default=None, metavar="URL",
              help="This service's URL as the EHR reaches it (for the SMART launch link and redirect URI; default: from the request).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Settings file (default ./fhir-crs.toml or $FHIR_CRS_CONFIG): timeout, windows, ca_bundle.")
@click.option("--allow-insecure-http", is_flag=True, help="Accept plain http:// FHIR servers that are not on loopback.")
@mapping_options
def serve(host: str, port: int, allow_fhir_servers: tuple[str, ...], server: str | None, ehr_origins: tuple[str, ...],
          cds_clients: tuple[str, ...], smart_client_id: str, smart_v2: bool, public_url: str | None, config_path: Path | None,
          allow_insecure_http: bool, mappings_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Serve the grade inside the EHR: a CDS Hooks service and a SMART on FHIR app.

    \b
    CDS Hooks 2.0:  GET  /cds-services  (discovery)
                    POST /cds-services/fhir-crs-crs-grade  (hook patient-view)
    SMART app:      GET  /launch  (EHR launch: ?iss=..&launch=..; standalone: ?iss=..)
                    redirect URI /callback, timeline page /app
    OpenAPI:        GET  /openapi.json
    \b
    Only the FHIR servers given with --allow-fhir-server (and --server) are ever called, and a
    bearer token only on its own server's origin. Tokens stay in the server's memory.
    CDS Hooks calls are authenticated only with --cds-client (the EHR's signed JWT);
    without it, run the service behind a gateway that authenticates the EHR.
    \b
    Example:
      fhir-crs serve --port 8080 --allow-fhir-server https://ehr.example.org/fhir
    """
    import socket

    import uvicorn

    from .errors import ConfigError
    from .serve import ServeConfig, create_app
    from .serve.config import SMART_SCOPE, SMART_SCOPE_V2, normalise_base, normalise_origin

    flags = {"server": server, "mappings": str(mappings_dir) if mappings_dir else None,
             "allow_insecure_http": True if allow_insecure_http else None}
    cfg = run_config(flags, config_path)
    code_map = load_code_map(Path(cfg.mappings) if cfg.mappings else None)
    settings = load_settings(code_map.directory, list(overrides))
    servers = ServeConfig.check_servers([*allow_fhir_servers, *([cfg.server] if cfg.server else [])], cfg.allow_insecure_http)
    if not smart_client_id.strip():
        raise ConfigError("--smart-client-id is empty.")
    from .serve.cds_auth import check_clients

    clients = check_clients(list(cds_clients), allow_insecure_http=cfg.allow_insecure_http)
    if clients and not public_url:
        raise ConfigError("--cds-client needs --public-url: the JWT's aud is checked against "
                          "PUBLIC_URL/cds-services/fhir-crs-crs-grade, never against the request's Host header.")
    config = ServeConfig(settings=settings, code_map=code_map, fhir_servers=servers,
                         ehr_origins=tuple(normalise_origin(o, "--allow-ehr-origin") for o in ehr_origins),
                         smart_client_id=smart_client_id.strip(), smart_scope=SMART_SCOPE_V2 if smart_v2 else SMART_SCOPE,
                         public_url=normalise_base(public_url, "--public-url") if public_url else None,
                         window_before_days=cfg.window_before_days, window_after_days=cfg.window_after_days,
                         timeout=cfg.timeout, allow_insecure_http=cfg.allow_insecure_http, ca_bundle=cfg.ca_bundle,
                         mappings=code_map.directory, cds_clients=clients)
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from exc
    click.echo(f"fhir-crs serve on http://{host}:{port}: CDS Hooks discovery /cds-services, SMART launch /launch; "
               f"{len(servers)} FHIR server(s) allowed", err=True)
    if clients:
        click.echo(f"CDS Hooks calls need a JWT signed by: {', '.join(c.issuer for c in clients)} "
                   f"(aud {config.cds_audience})", err=True)
    else:
        click.echo("WARNING: CDS Hooks calls are NOT authenticated (no --cds-client ISS=JWKS_URL): anyone who can "
                   "reach this port can ask for a patient's grade and make the service read the allowed FHIR servers. "
                   "Run it only behind a gateway that authenticates the EHR, or pass --cds-client.", err=True)
    # no access log: SMART redirects carry authorization codes and launch tokens in their query
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
