"""Files users hand us and files we write for them.

Text files (training data, calibration samples) are UTF-8, with the byte-order mark that Windows tools write
accepted; a file that is not UTF-8 is refused with where it goes wrong. Weights are written readable as the
user's umask says (safetensors itself creates them owner-only, which breaks shared model folders).

    text = read_text_file(path, "data file")
    save_safetensors(tensors, folder / "model.safetensors")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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


def read_json_object(file: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object (config.json and its kind), its problems named with the file.

    Raises:
        ValueError: not JSON, not UTF-8, or not an object.
    """
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {file} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented UTF-8 JSON, written atomically (a crash never leaves a user's config.json half-written)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, then the permissions any other file gets (0666 less the umask)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata if metadata is not None else {"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file beside `path` and rename it over `path`: never half a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
