"""Bulk part of scripts/bench_sync.py: `$export` the local server, then compare streaming the
NDJSON through the mappers and graders with streaming it through a bare JSON parse."""

from __future__ import annotations

import time

from fhir_crs.events import Skipped
from fhir_crs.fhir import BulkExport, FhirClient, NoAuth
from fhir_crs.mappers import ResourceMapper
from fhir_crs.mapping_files import load_code_map
from fhir_crs.pipeline import grade_mapping
from fhir_crs.settings import load_settings
from fhir_crs.sources import SourceResource


def bulk_bench(base: str) -> dict[str, float]:
    """`$export` the server and read it back; prints and returns the numbers."""
    client = FhirClient(base, auth=NoAuth(), timeout=600)
    exporter = BulkExport(client, poll_interval=0.5, max_poll_interval=5, timeout=3600)
    out: dict[str, float] = {}
    t = time.perf_counter()
    manifest = exporter.wait(exporter.kickoff())
    out["export_s"] = time.perf_counter() - t
    print(f"bulk $export (kick-off to manifest): {out['export_s']:.1f} s, {len(manifest.output)} files")
    t = time.perf_counter()
    n = sum(1 for rtype, _ in exporter.iter_resources(manifest) if rtype)
    parse_s = time.perf_counter() - t
    out["download_parse_rps"] = n / parse_s
    print(f"bulk NDJSON download + bare parse: {n / parse_s:,.0f} resources/s ({n:,} resources, {parse_s:.1f} s)")
    code_map = load_code_map()
    settings = load_settings(code_map.directory)
    t = time.perf_counter()
    mapper = ResourceMapper(code_map)
    for rtype, item in exporter.iter_resources(manifest):
        mapper.add(SourceResource(item, "bulk") if rtype else Skipped(str(item), "unusable line"))
    run = grade_mapping(mapper.finish(), settings, mapper.count)
    grade_s = time.perf_counter() - t
    out["download_grade_rps"] = mapper.count / grade_s
    out["cases"] = len(run.cases)
    print(f"bulk NDJSON download + map + grade: {mapper.count / grade_s:,.0f} resources/s "
          f"({len(run.cases)} cases, {grade_s:.1f} s)")
    if manifest.status_url:
        exporter.cancel(manifest.status_url)
    return out
