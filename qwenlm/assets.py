"""Where qwenlm finds the real `qwen.tiktoken` when it has to make a checkpoint of its own.

Real checkpoints carry their own `qwen.tiktoken`; this module is only for the random-weight test
and demo checkpoints. The file ships, byte-identical, inside the PyPI wheel `dashscope==2.0.2`, so
we take it from there once per machine and keep it in the user cache:

    path = qwen_tiktoken_path()   # ~/.cache/qwenlm/qwen.tiktoken, fetched on first use
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
DASHSCOPE_WHEEL = "dashscope==2.0.2"
_MEMBER = "dashscope/resources/qwen.tiktoken"


def cache_dir() -> Path:
    """The user cache folder for qwenlm (`$QWENLM_CACHE`, else `~/.cache/qwenlm`)."""
    root = os.environ.get("QWENLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwenlm"
    )
    return Path(root)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_genuine(path: Path) -> bool:
    return path.is_file() and sha256_of(path) == QWEN_TIKTOKEN_SHA256


def _from_installed_dashscope() -> bytes | None:
    try:
        from importlib.resources import files

        return (files("dashscope") / "resources" / "qwen.tiktoken").read_bytes()
    except Exception:  # not installed, or a version without the file
        return None


def _from_pypi_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DASHSCOPE_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("dashscope-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {DASHSCOPE_WHEEL} to get qwen.tiktoken "
                f"(pip said: {done.stderr.strip()[-500:]}). Put a copy of qwen.tiktoken at "
                f"{cache_dir() / 'qwen.tiktoken'} or point $QWENLM_TIKTOKEN at one."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(_MEMBER)


def qwen_tiktoken_path() -> Path:
    """Return a verified local copy of the real `qwen.tiktoken`, fetching it once if needed.

    Order: `$QWENLM_TIKTOKEN`, the user cache, an installed `dashscope`, the `dashscope` wheel on PyPI.

    Raises:
        RuntimeError: no genuine copy could be found or fetched (hash mismatch included).
    """
    override = os.environ.get("QWENLM_TIKTOKEN")
    if override:
        if not _is_genuine(Path(override)):
            raise RuntimeError(f"$QWENLM_TIKTOKEN={override} is missing or not the genuine qwen.tiktoken")
        return Path(override)
    cached = cache_dir() / "qwen.tiktoken"
    if _is_genuine(cached):
        return cached
    data = _from_installed_dashscope() or _from_pypi_wheel()
    if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
        raise RuntimeError("the qwen.tiktoken found in dashscope does not have the expected sha256")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".tmp{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(cached)  # atomic: parallel test workers never see half a file
    return cached
