#!/usr/bin/env python3
"""Regenerates mappings/grading.toml from fhir_crs/settings.py (defaults, documentation and the
allowed range of every setting), keeping the file's provenance header. Run after adding a setting."""

from __future__ import annotations

import json
from pathlib import Path

from fhir_crs.settings import GradingSettings
from fhir_crs.validation import allowed

path = Path(__file__).resolve().parent.parent / "fhir_crs" / "mappings" / "grading.toml"
head = path.read_text().split("[conventions]")[0].rstrip("\n")
lines = [head, "", "[conventions]"]
s = GradingSettings()
for name, info in GradingSettings.model_fields.items():
    v = getattr(s, name)
    tv = ("true" if v else "false") if isinstance(v, bool) else json.dumps(list(v)) if isinstance(v, tuple) else repr(v)
    meta = GradingSettings.meta(name)
    lines += [f"# [{meta['tag']}] {meta['doc']}", f"#     allowed: {allowed(info)}", f"{name} = {tv}"]
path.write_text("\n".join(lines) + "\n")
print(f"wrote {path}")
