"""A real `qwenlm serve` / `qwenlm web` process for end-to-end tests: a free port, a wait for /health, and SIGINT
(Ctrl-C, the graceful path users take) at the end, with the tail of its log printed for failures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 90) -> None:
    """Poll `base`/health until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited during start-up:\n{Path(log_path).read_text()[-5000:]}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"server did not come up in {timeout:.0f} s:\n{Path(log_path).read_text()[-5000:]}")


def start_server(
    checkpoint: Path | str,
    log_path: Path,
    *args: str,
    command: str = "serve",
    python: Path | str = sys.executable,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `python -m qwenlm COMMAND --model checkpoint --port P *args` (not waiting); returns (process, base URL)."""
    port = free_port()
    argv = [str(python), "-m", "qwenlm", command, "--model", str(checkpoint), "--port", str(port), *args]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=Path(log_path).parent)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running_server(checkpoint: Path | str, log_path: Path, *args: str, command: str = "serve",
                   timeout: float = 90) -> Iterator[tuple[str, subprocess.Popen]]:  # fmt: skip
    """`qwenlm COMMAND --model checkpoint *args` on a free port: yields (base URL, process); SIGINT at the end."""
    proc, base = start_server(checkpoint, log_path, *args, command=command)
    try:
        wait_healthy(proc, base, log_path, timeout)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(Path(log_path).read_text()[-3000:])
