"""The flat-memory `grade --json` path (issue 17): events spill to patient-hash partitions on
disk and the JSON is streamed — and the output is byte for byte the in-memory path's."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fhir_crs import spill
from fhir_crs.cli import cli
from fhir_crs.events import Skipped
from fhir_crs.pipeline import run_paths, stream_grade

VIGNETTES = Path(__file__).resolve().parents[1] / "fixtures" / "R4" / "vignettes"
PICU = Path(__file__).resolve().parents[1] / "fixtures" / "cohort" / "picu"


def in_memory(paths: list[Path], series: bool = False) -> bytes:
    return orjson.dumps(run_paths(paths).to_json(series=series), option=orjson.OPT_INDENT_2) + b"\n"


def streamed(paths: list[Path], series: bool = False) -> bytes:
    out = io.BytesIO()
    stream_grade(paths, out, series=series)
    return out.getvalue()


@pytest.fixture()
def tiny_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many partitions and a spill every few events: every boundary is exercised."""
    monkeypatch.setattr(spill, "PARTITION_INPUT_BYTES", 20_000)
    monkeypatch.setattr(spill, "SPILL_EVENTS", 7)
    monkeypatch.setattr(spill, "SPILL_SKIPS", 2)


@pytest.mark.parametrize("series", [False, True])
def test_streamed_output_is_byte_identical(series: bool, tiny_buffers: None) -> None:
    assert spill.partitions_for(spill.MAX_PARTITIONS * 10**9) == spill.MAX_PARTITIONS
    paths = [VIGNETTES, PICU]
    assert spill.partitions_for(sum(f.stat().st_size for p in paths for f in p.rglob("*.json"))) > 20
    assert streamed(paths, series) == in_memory(paths, series)


def test_streamed_output_with_default_buffers() -> None:
    assert streamed([VIGNETTES]) == in_memory([VIGNETTES])


def test_cli_json_streams_the_same_bytes(tiny_buffers: None) -> None:
    res = CliRunner().invoke(cli, ["grade", str(VIGNETTES), "--json"])
    assert res.exit_code == 0, res.output
    assert res.stdout_bytes == in_memory([VIGNETTES])


def test_no_cases_and_no_skips_render_like_orjson() -> None:
    """Empty lists are printed `[]`, as orjson prints them."""
    out = io.BytesIO()
    spill.write_grade_json(out, iter(()), iter(()), lambda n: {"resources_read": 0, "resources_used": -n,
                                                               "settings": {"a": [1, {"b": None}], "c": {}}})
    assert out.getvalue() == orjson.dumps({"cases": [], "skipped": [], "resources_read": 0, "resources_used": 0,
                                           "settings": {"a": [1, {"b": None}], "c": {}}}, option=orjson.OPT_INDENT_2) + b"\n"


def test_every_copy_twice_settles_like_the_in_memory_mapper(tiny_buffers: None, tmp_path: Path) -> None:
    """The same export read twice, and a resource in two versions in different files: the
    flat-memory path picks the same winners and names the same superseded copies, in order."""
    newer = tmp_path / "z-newer.json"
    obs = orjson.loads((VIGNETTES / "V01.json").read_bytes())
    entry = next(e for e in obs["entry"] if e["resource"]["resourceType"] == "Observation")
    r = dict(entry["resource"], meta={"versionId": "7"})
    newer.write_bytes(orjson.dumps(r))
    paths = [VIGNETTES, PICU, VIGNETTES, newer]
    got = streamed(paths)
    assert got == in_memory(paths)
    assert b'"code": "superseded"' in got


def test_events_are_not_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While reading, the store keeps at most SPILL_EVENTS events buffered; everything the mapper
    produced is on disk before the input ends (the mapper does not hold copies back)."""
    from fhir_crs.mappers import ResourceMapper
    from fhir_crs.mapping_files import load_code_map
    from fhir_crs.sources import iter_paths

    monkeypatch.setattr(spill, "SPILL_EVENTS", 50)
    store = spill.SpillStore(tmp_path, 5)
    mapper = ResourceMapper(load_code_map(None), store, spill=store.spill_kept)
    peak = 0
    items = 0
    for item in iter_paths([PICU]):
        mapper.add(item)
        store.maybe_spill()
        peak = max(peak, store._buffered)
        items += 1
    on_disk = sum(1 for part in range(5) for _ in _records(store._path("copies", part))) + sum(len(v) for v in store._copies.values())
    assert peak < 50 + 20  # one resource yields a handful of events at most
    assert not mapper._kept or all(ref.startswith("Medication/") for ref in mapper._kept)
    assert on_disk >= 0.9 * items
    mapper.finish()
    store.settle(mapper)
    from fhir_crs.pipeline import map_items

    expected, _ = map_items(iter_paths([PICU]), load_code_map(None))
    loaded: dict[str, list[object]] = {}
    for part in store.patient_partitions():
        loaded.update(store.load_patients(part)[0])
    assert loaded == expected.events


def _records(path: Path) -> list[object]:
    return [r for batch in spill._read_pickles(path) for r in batch]


def test_skip_log_spills_and_rolls_back_only_unspilled_entries(tmp_path: Path) -> None:
    log = spill.SkipLog(tmp_path / "s.pickle")
    for i in range(3):
        log.append(Skipped(f"Observation/{i}", "r", "other"))
    log.spill()
    log.append(Skipped("Observation/3", "r", "other"))
    before = len(log)
    log.append(Skipped("Observation/4", "r", "other"))
    del log[before:]
    assert [s.resource for s in log] == [f"Observation/{i}" for i in range(4)]
    with pytest.raises(IndexError):
        del log[1:]
