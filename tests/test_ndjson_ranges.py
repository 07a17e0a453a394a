"""The two ways of reading part of a plain NDJSON file agree with reading it whole: the Spark
engine's self-aligning splits (`iter_ndjson_split`, any byte offsets) and the worker processes'
pre-aligned ranges (`ndjson_cuts` + `iter_ndjson_range`) yield exactly `_iter_ndjson`'s items,
line numbers and skips included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_crs.sources import _iter_ndjson, iter_ndjson_range, iter_ndjson_split, ndjson_cuts


def _key(item) -> str:
    return repr(item)


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    lines = []
    for i in range(40):
        lines.append(json.dumps({"resourceType": "Observation", "id": f"o{i}", "status": "final",
                                 "valueQuantity": {"value": 38 + i / 10, "unit": "Cel"}}))
        if i % 7 == 3:
            lines.append("{not json")
        if i % 11 == 5:
            lines.append("")
    f = tmp_path / "Observation.ndjson"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


@pytest.mark.parametrize("step", [1, 7, 64, 333, 10_000])
def test_splits_at_any_offsets_yield_the_whole_file(export: Path, step: int) -> None:
    whole = [_key(x) for x in _iter_ndjson(export)]
    size = export.stat().st_size
    parts = []
    for start in range(0, size, step):
        parts += [_key(x) for x in iter_ndjson_split(export, start, min(start + step, size))]
    assert parts == whole


@pytest.mark.parametrize("chunk", [50, 200, 1000, 1 << 20])
def test_cut_ranges_yield_the_whole_file(export: Path, chunk: int) -> None:
    whole = [_key(x) for x in _iter_ndjson(export)]
    parts = []
    for start, end, before in ndjson_cuts(export, chunk):
        parts += [_key(x) for x in iter_ndjson_range(export, start, end, before)]
    assert parts == whole
