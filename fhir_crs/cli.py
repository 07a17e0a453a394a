"""Command line: `fhir-crs grade PATH...` (offline). Parses flags, calls the pipeline, renders;
maps the `FhirCrsError` tree to one-line messages and exit codes (errors.py)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console

from . import __version__
from .errors import FhirCrsError
from .mapping_files import default_mappings_dir
from .settings import load_settings


class CrsGroup(click.Group):
    """Click group with one central error handler."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FhirCrsError as exc:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            click.echo(f"fhir-crs: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def mapping_options(f: Any) -> Any:
    f = click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
                     help="Override a grading convention (see mappings/grading.toml).")(f)
    f = click.option("--mappings", "mappings_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Folder of site mapping tables (default: ./mappings of this install or $FHIR_CRS_MAPPINGS).")(f)
    return f


@click.group(cls=CrsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fhir-crs")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def cli(verbose: bool) -> None:
    """fhir-crs: grade CAR-T cytokine release syndrome (CRS) and ICANS from FHIR R4 data.

    \b
    Example:
      fhir-crs grade fixtures/R4/vignettes --json
    """


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the grade contract).")
@click.option("--show-skips", is_flag=True, help="List every skipped resource with its reason.")
@click.option("--strict", is_flag=True, help="Exit non-zero (7) if any resource was skipped.")
@mapping_options
def grade(paths: tuple[Path, ...], as_json: bool, show_skips: bool, strict: bool,
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
    from .pipeline import run_paths

    settings = load_settings(mappings_dir or default_mappings_dir(), list(overrides))
    run = run_paths(list(paths), settings, mappings_dir)
    data = run.to_json()
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        render_out(data, show_skips)
    if strict and data["skipped"]:
        click.echo(f"fhir-crs: {len(data['skipped'])} resource(s) skipped (--strict)", err=True)
        sys.exit(7)


def render_out(data: dict[str, Any], show_skips: bool) -> None:
    from .render import render_run

    render_run(data, Console(), show_skips)


def main() -> None:
    cli(prog_name="fhir-crs")
