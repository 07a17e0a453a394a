"""Reading the text files a site edits (settings, config, mapping tables).

They are UTF-8. Editors on Windows often save with a byte order mark, or as UTF-16 ("Unicode"):
a BOM'd UTF-8 or UTF-16 file is read as such; anything else that is not UTF-8 is refused with one
line naming the file and where the first bad byte is.
"""

from __future__ import annotations

import codecs
from pathlib import Path

_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class TextFileError(ValueError):
    """The file is not UTF-8 text (message names the file)."""


def decode_text(data: bytes, path: Path | str) -> str:
    for bom, encoding in _BOMS:  # UTF-32 LE starts with the UTF-16 LE mark: test it first
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise TextFileError(f"{path} starts with a {encoding.upper()} byte order mark but is not valid {encoding.upper()} "
                                    f"(byte {exc.start}).") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TextFileError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                            "save it as UTF-8.") from exc


def read_text(path: Path) -> str:
    """The file's text (BOM'd UTF-8/UTF-16/UTF-32 accepted); OSError and TextFileError propagate."""
    return decode_text(path.read_bytes(), path)
