"""`fhir-crs grade --engine spark` (issue 15): the same answer as the local engine, byte for byte,
on the vignettes and on a generated cohort with bad input mixed in; `--out DIR` as JSON lines and
Parquet; a very large patient within the stated memory bound. One SparkSession (local[2]) for the
whole test session (conftest `spark`); without pyspark or Java these skip with the reason, except
in CI, where they must run."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner
from conftest import ROOT, SHARED
from factory import bp, cart, med, patient, temp

from fhir_crs import spark as engine
from fhir_crs.cli import cli
from fhir_crs.mapping_files import load_code_map
from fhir_crs.pipeline import stream_grade
from fhir_crs.settings import load_settings

# py4j (the driver's bridge to the JVM) leaves local sockets to the garbage collector
pytestmark = [pytest.mark.spark, pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
SCHEMAS = [ROOT / "tests" / "contracts" / "grade.schema.json", SHARED / "contracts" / "grade.schema.json"]


def local_json(paths: list[Path]) -> bytes:
    out = io.BytesIO()
    stream_grade(paths, out, load_settings(ROOT / "mappings"))
    return out.getvalue()


def spark_json(spark: Any, paths: list[Path]) -> bytes:
    code_map = load_code_map(None)
    settings = load_settings(code_map.directory)
    run = engine.grade_spark(spark, [str(p) for p in paths], code_map, settings)
    out = io.BytesIO()
    engine.write_contract(run, out, settings)
    run.rdd.unpersist()
    return out.getvalue()


def validate(data: dict[str, Any]) -> None:
    for path in SCHEMAS:
        if path.exists():  # the shared copy is absent on some machines; the project's copy never is
            jsonschema.validate(data, json.loads(path.read_text()))


def test_vignettes_cli_spark_equals_local_byte_for_byte(spark: Any) -> None:
    runner = CliRunner()
    local = runner.invoke(cli, ["grade", str(VIGNETTES), "--json"])
    remote = runner.invoke(cli, ["grade", str(VIGNETTES), "--json", "--engine", "spark", "--master", "local[2]"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.stderr
    assert remote.stdout_bytes == local.stdout_bytes
    data = json.loads(remote.stdout)
    validate(data)
    assert len(data["cases"]) >= 20 and [(c["patient"], c["infusion"]) for c in data["cases"]] == sorted(
        (c["patient"], c["infusion"]) for c in data["cases"])


def _cohort(tmp: Path, patients: int) -> list[Path]:
    """The project's synthetic cohort as a Bulk export (NDJSON per type) and a few Bundles, with
    bad input of every level mixed in: an unparsable line, an empty file, an unused type, an
    impossible time, versions (a later one moving the subject to another patient; an older copy
    read after the newer one), a shared Medication in two versions, cited by reference."""
    from fhir_crs.synthetic import generate_cohort

    export, bundles = tmp / "export", tmp / "bundles"
    export.mkdir()
    bundles.mkdir()
    lines: dict[str, list[bytes]] = {}
    for i, bundle in enumerate(generate_cohort(patients, seed=15)):
        if i % 4 == 3:
            (bundles / f"b{i}.json").write_bytes(orjson.dumps(bundle))
            continue
        for e in bundle["entry"]:
            lines.setdefault(e["resource"]["resourceType"], []).append(orjson.dumps(e["resource"]))
    first = orjson.loads(lines["Patient"][0])["id"]
    second = orjson.loads(lines["Patient"][1])["id"]
    moved = temp(30, 39.6, pid=first)
    moved["id"], moved["meta"] = "moved-1", {"versionId": "1"}
    moved2 = dict(moved, subject={"reference": f"Patient/{second}"}, meta={"versionId": "2"})
    stale = dict(moved, meta={"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"})
    bad_time = temp(31, 39.0, pid=first)
    bad_time["effectiveDateTime"] = "2025-13-45T25:61:00Z"
    toci = {"resourceType": "Medication", "id": "toci", "meta": {"versionId": "1"},
            "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "612865"}]}}
    toci2 = dict(toci, meta={"versionId": "2"})
    admin = med(None, 40, pid=second)
    admin.pop("medicationCodeableConcept", None)
    admin["medicationReference"] = {"reference": "Medication/toci"}
    extra = [moved, moved2, stale, bad_time, admin]
    lines["Observation"][5:5] = [orjson.dumps(r) for r in extra[:4]]
    lines["Observation"].insert(50, b"{not json")
    lines["MedicationAdministration"].append(orjson.dumps(admin))
    lines["Medication"] = [orjson.dumps(toci), orjson.dumps(toci2)]
    lines["Encounter"] = [orjson.dumps({"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": f"Patient/{first}"}})]
    for rtype, rows in lines.items():
        (export / f"{rtype}.ndjson").write_bytes(b"\n".join(rows) + b"\n")
    (export / "Empty.ndjson").write_bytes(b"")
    return [export, bundles]


def test_generated_cohort_spark_equals_local_with_bad_input_and_split_files(spark: Any, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _cohort(tmp_path, 16)
    monkeypatch.setattr(engine, "SPLIT_BYTES", 300_000)  # Observation.ndjson is read by several tasks
    tasks, _, _ = engine.plan_reads([str(p) for p in paths])
    assert sum(1 for t in tasks for p in t.pieces if p.end >= 0) > 3
    local = local_json(paths)
    assert spark_json(spark, paths) == local
    data = json.loads(local)
    validate(data)
    codes = {s["code"] for s in data["skipped"]}
    assert {"superseded", "invalid_json", "empty_file", "unused_type", "impossible_time"} <= codes
    assert len({c["patient"] for c in data["cases"]}) >= 12
    assert data["resources_read"] == data["resources_used"] + len(data["skipped"])


def test_out_dir_json_lines_and_parquet(spark: Any, tmp_path: Path) -> None:
    local = json.loads(local_json([VIGNETTES]))
    out = tmp_path / "grades"
    r = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--engine", "spark", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line) for line in (out / "cases.ndjson").read_text().splitlines()] == local["cases"]
    assert [json.loads(line) for line in (out / "skipped.ndjson").read_text().splitlines()] == local["skipped"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == len(local["cases"]) and summary["resources_read"] == local["resources_read"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # the cases name patients: owner-only
    assert stat.S_IMODE((out / "cases.ndjson").stat().st_mode) == 0o600
    # a folder that holds files is never written into
    again = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--engine", "spark", "--out", str(out)])
    assert again.exit_code == 3 and "not an empty folder" in again.stderr
    assert sorted(os.listdir(tmp_path)) == ["grades"]  # and nothing else was left behind

    pq = tmp_path / "pq"
    r = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--engine", "spark", "--out", str(pq), "--format", "parquet"])
    assert r.exit_code == 0, r.stderr
    rows = spark.read.parquet(str(pq / "cases.parquet")).collect()
    got = sorted((row.patient, row.infusion, row.crs_astct_grade, json.loads(row.case_json)["crs"]["astct"]["grade"]) for row in rows)
    assert got == sorted((c["patient"], c["infusion"], c["crs"]["astct"]["grade"], c["crs"]["astct"]["grade"]) for c in local["cases"])
    assert spark.read.parquet(str(pq / "skipped.parquet")).count() == len(local["skipped"])
    # Spark writes its part files with the umask's modes (0644 here): every one is owner-only too
    modes = {str(p.relative_to(pq)): stat.S_IMODE(p.stat().st_mode) for p in [pq, *pq.rglob("*")]}
    assert any(name.startswith("cases.parquet/part-") for name in modes), sorted(modes)
    assert {name: m for name, m in modes.items() if m != (0o700 if (pq / name).is_dir() else 0o600)} == {}


# The stated bound (spark.py): a Python worker holds one patient's compact events, its cases and at
# most spark.python.worker.memory (64 MiB in these tests) of sort buffer: ~0.5 KiB per event.
BIG_OBSERVATIONS = 100_800  # 70 days of minute-level temperature + SBP
WORKER_BOUND_MIB = 150 + 64 + BIG_OBSERVATIONS * 0.5 / 1024


def test_a_patient_with_100k_observations_stays_within_the_worker_memory_bound(spark: Any, tmp_path: Path) -> None:
    d = tmp_path / "icu"
    d.mkdir()
    with (d / "Observation.ndjson").open("wb") as fh:
        for i in range(BIG_OBSERVATIONS // 2):
            h = -24 + i / 30  # every 2 minutes each, from the day before the infusion
            fh.write(orjson.dumps(temp(h, 39.2 if 24 < h < 72 else 36.8, pid="icu")) + b"\n")
            fh.write(orjson.dumps(bp(h, 84 if 30 < h < 60 else 118, pid="icu")) + b"\n")
    (d / "Patient.ndjson").write_bytes(orjson.dumps(patient("icu")) + b"\n")
    (d / "Procedure.ndjson").write_bytes(orjson.dumps(cart(0, pid="icu")) + b"\n")
    code_map = load_code_map(None)
    settings = load_settings(code_map.directory)
    run = engine.grade_spark(spark, [str(d)], code_map, settings)
    out = io.BytesIO()
    engine.write_contract(run, out, settings)
    peak_mib = run.executor_peak_rss_kib / 1024
    run.rdd.unpersist()
    assert out.getvalue() == local_json([d])
    data = json.loads(out.getvalue())
    assert data["resources_read"] == BIG_OBSERVATIONS + 2 and data["cases"][0]["crs"]["astct"]["grade"] >= 2
    print(f"one patient, {BIG_OBSERVATIONS} Observations: Python worker peak RSS {peak_mib:.0f} MiB (bound {WORKER_BOUND_MIB:.0f} MiB)")
    assert 0 < peak_mib < WORKER_BOUND_MIB


def test_without_java_the_command_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'fhir-crs[spark]')")
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    r = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--engine", "spark", "--json"])
    assert r.exit_code == 10
    assert r.stderr.strip().splitlines() == [
        "fhir-crs: error: --engine spark cannot start: Java 17 is missing (no java on PATH and JAVA_HOME is not set)."]
    assert json.loads(r.stdout)["error"]["code"] == "engine"


def test_spark_flags_need_the_spark_engine_and_a_missing_path_fails_before_spark_starts(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--engine spark" in r.stderr
    r = CliRunner().invoke(cli, ["grade", str(tmp_path / "nope"), "--engine", "spark"])
    assert r.exit_code == 3 and "does not exist" in r.stderr
