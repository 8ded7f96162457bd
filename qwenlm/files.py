"""Reading the text files users hand us (training data, calibration samples): UTF-8, with the byte-order mark
that Windows tools write accepted, and a file that is not UTF-8 refused with where it goes wrong.

    text = read_text_file(path, "data file")
"""

from __future__ import annotations

import os
from pathlib import Path


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The file's text (a leading UTF-8 BOM dropped).

    Raises:
        FileNotFoundError: no such file (named as `what`).
        ValueError: the file is not UTF-8; the message names the file, line and column and the offending byte.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist")
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        before = raw[: err.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise ValueError(
            f"{file}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); save the {what} as UTF-8"
        ) from None
