"""`grade --workers N` (issue 17): the flat-memory path on N processes prints byte for byte
what one process prints — units cut inside NDJSON files, copies of one resource in different
units, source-level skips, no-infusion patients, Medications resolved across units."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fhir_crs import parallel, spill
from fhir_crs.cli import cli
from fhir_crs.errors import InputError
from fhir_crs.pipeline import run_paths, stream_grade
from fhir_crs.sources import iter_paths

ROOT = Path(__file__).resolve().parents[1]
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
PICU = ROOT / "fixtures" / "cohort" / "picu"


def streamed(paths: list[Path], workers: int, series: bool = False) -> bytes:
    out = io.BytesIO()
    stream_grade(paths, out, workers=workers, series=series)
    return out.getvalue()


def in_memory(paths: list[Path]) -> bytes:
    return orjson.dumps(run_paths(paths).to_json(), option=orjson.OPT_INDENT_2) + b"\n"


@pytest.fixture()
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units of a few resources, many partitions, a spill every few events: every boundary."""
    monkeypatch.setattr(parallel, "UNIT_BYTES", 30_000)
    monkeypatch.setattr(spill, "PARTITION_INPUT_BYTES", 60_000)
    monkeypatch.setattr(spill, "SPILL_EVENTS", 11)
    monkeypatch.setattr(spill, "SPILL_SKIPS", 3)


def bulk_export(folder: Path, sources: list[Path], extra: tuple[bytes, ...] | list[bytes] = ()) -> Path:
    """The fixtures as a Bulk export (one NDJSON file per type), with `extra` lines appended to
    the Observation file (invalid JSON, blank lines, later versions)."""
    folder.mkdir()
    files: dict[str, list[bytes]] = {}
    medications: list[bytes] = []
    for item in iter_paths(sources):
        r = getattr(item, "resource", None)
        if r is None:
            continue
        if "id" not in r and item.full_url:  # Bundle entries: urn:uuid ids and references become Type/id
            r = dict(r, id=item.full_url.rsplit(":", 1)[-1])
        line = orjson.dumps(r)
        for url, (t, i) in (item.bundle_urls or {}).items():
            line = line.replace(f'"{url}"'.encode(), f'"{t}/{i}"'.encode())
        if r["resourceType"] == "Medication":
            medications.append(line)  # written last: the administrations citing them come first
        else:
            files.setdefault(r["resourceType"], []).append(line)
    files.setdefault("Observation", []).extend(extra)
    for i, line in enumerate(files.get("MedicationAdministration", [])):  # drugs as Medication resources
        ma = orjson.loads(line)
        if "medicationCodeableConcept" in ma:
            med = {"resourceType": "Medication", "id": f"med-{len(medications)}", "code": ma.pop("medicationCodeableConcept")}
            medications.append(orjson.dumps(med))
            ma["medicationReference"] = {"reference": f"Medication/{med['id']}"}
            files["MedicationAdministration"][i] = orjson.dumps(ma)
    files["Medication"] = medications
    for rtype, lines in files.items():
        if lines:
            (folder / f"{rtype}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    return folder


@pytest.fixture()
def parallel_runs(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What each run_parallel call returned (None: the one-process path ran instead)."""
    calls: list[object] = []
    real = parallel.run_parallel

    def spy(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(result)
        return result

    monkeypatch.setattr(parallel, "run_parallel", spy)
    return calls


def test_workers_print_the_same_bytes_as_one_process(small_units: None, tmp_path: Path, parallel_runs: list[object]) -> None:
    export = bulk_export(tmp_path / "export", [VIGNETTES, PICU])
    obs = orjson.loads((export / "Observation.ndjson").read_bytes().splitlines()[3])
    newer = orjson.dumps(dict(obs, meta={"versionId": "7"}, valueQuantity={"value": 39.9, "unit": "Cel"}))
    older = orjson.dumps(dict(obs, meta={"versionId": "1"}))
    with (export / "Observation.ndjson").open("ab") as fh:
        fh.write(b"\n".join([newer, b"", b"{not json", older, b"[1, 2]"]) + b"\n")
    units = parallel.plan_units([export], parallel.UNIT_BYTES)
    assert sum(not u.whole for u in units) > 20  # NDJSON files are cut into many ranges
    one = streamed([export], 1, series=True)
    assert b'"code": "superseded"' in one and b'"code": "invalid_json"' in one
    assert b'"MedicationAdministration/' in one.split(b'"skipped"')[0]  # drugs resolved through Medications
    assert streamed([export], 2, series=True) == one
    assert len(parallel_runs) == 1 and parallel_runs[0] is not None


def test_workers_on_json_files_equal_the_in_memory_path(small_units: None) -> None:
    paths = [VIGNETTES, PICU]
    assert streamed(paths, 2) == in_memory(paths)


def test_a_medication_in_two_copies_falls_back_to_one_process(small_units: None, tmp_path: Path,
                                                             parallel_runs: list[object]) -> None:
    export = bulk_export(tmp_path / "export", [VIGNETTES])
    meds = (export / "Medication.ndjson").read_bytes().splitlines()
    assert meds
    (export / "Medication.ndjson").write_bytes(b"\n".join([*meds, *meds]) + b"\n")
    assert streamed([export], 2) == streamed([export], 1)
    assert parallel_runs == [None]


def test_input_errors_are_the_one_process_errors(small_units: None, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.ndjson").write_bytes(b"{bad\n" * 5000)
    for paths in ([VIGNETTES, empty], [tmp_path / "missing"], [empty]):
        messages = []
        for workers in (1, 2):
            with pytest.raises(InputError) as exc:
                streamed(paths, workers)
            messages.append(str(exc.value))
        assert messages[0] == messages[1]


def test_cli_workers(small_units: None) -> None:
    one = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--json", "--workers", "1"])
    two = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--json", "--workers", "2"])
    assert one.exit_code == two.exit_code == 0, two.output
    assert one.stdout_bytes == two.stdout_bytes
    text1 = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--workers", "1"])
    text2 = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--workers", "2"])
    assert text1.exit_code == text2.exit_code == 0
    assert text1.output == text2.output
    bad = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--workers", "0"])
    assert bad.exit_code == 2
