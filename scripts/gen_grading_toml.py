#!/usr/bin/env python3
"""Regenerates mappings/grading.toml from fhir_crs/settings.py (defaults + documentation),
keeping the file's provenance header. Run after adding a setting."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from fhir_crs.settings import GradingSettings

path = Path(__file__).resolve().parent.parent / "mappings" / "grading.toml"
head = path.read_text().split("[conventions]")[0].rstrip("\n")
lines = [head, "", "[conventions]"]
s = GradingSettings()
for f in fields(s):
    v = getattr(s, f.name)
    tv = ("true" if v else "false") if isinstance(v, bool) else json.dumps(list(v)) if isinstance(v, tuple) else repr(v)
    lines += [f"# [{f.metadata['tag']}] {f.metadata['doc']}", f"{f.name} = {tv}"]
path.write_text("\n".join(lines) + "\n")
print(f"wrote {path}")
