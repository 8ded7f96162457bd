"""Other versions of the CPU kernels, built to load beside the package's own (the benchmarks' A/B comparisons).

A kernel change is best judged against the previous code in one process, round by round, on a host whose memory
speed drifts: two builds registered under different op namespaces can be called alternately.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from qwenlm import kernels
from qwenlm.kernels.cpu import _AVX2_CFLAGS, _AVX2_SOURCE, _CFLAGS, _REQUIRED_CPU_FLAGS, _SOURCE, build_and_load_library

KERNEL_DIR = Path(kernels.__file__).parent
REPO = KERNEL_DIR.parent.parent


def _source(revision: str | None, name: str) -> str:
    if revision is None:
        return (KERNEL_DIR / name).read_text()
    done = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:qwenlm/kernels/{name}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"cannot read qwenlm/kernels/{name} at {revision!r}: {done.stderr.strip()}")
    return done.stdout


# Each op library: its source, the op namespace it registers, its compiler flags and the CPU flags it needs.
LIBRARIES = {
    "avx512": (_SOURCE.name, "qwenlm_kernels", _CFLAGS, _REQUIRED_CPU_FLAGS),
    "avx2": (_AVX2_SOURCE.name, "qwenlm_avx2", _AVX2_CFLAGS, ("avx2", "fma")),
}


def load_kernel_build(revision: str | None, namespace: str, build_root: Path, library: str = "avx512"):
    """torch.ops.<namespace>: the op library `library` (LIBRARIES: cpu_gemv.cpp or cpu_gemv_avx2.cpp) and the
    headers beside it as at git `revision` (None: the working tree), with their op namespace renamed to
    `namespace`, compiled under build_root (a fresh build cache)."""
    source, own_namespace, cflags, required = LIBRARIES[library]
    names = [source] + sorted(p.name for p in KERNEL_DIR.glob("*.h"))
    src = build_root / namespace
    src.mkdir(parents=True, exist_ok=True)
    for name in names:
        (src / name).write_text(_source(revision, name).replace(own_namespace, namespace))
    saved = os.environ.get("QWENLM_KERNEL_CACHE")
    os.environ["QWENLM_KERNEL_CACHE"] = str(build_root / "cache")  # where build_and_load_library builds
    try:
        result = build_and_load_library(src / source, namespace, cflags, required)
    finally:
        if saved is None:
            del os.environ["QWENLM_KERNEL_CACHE"]
        else:
            os.environ["QWENLM_KERNEL_CACHE"] = saved
    if not result.ok:
        raise SystemExit(f"cannot build the kernels of {revision or 'the working tree'}: {result.status}")
    return getattr(torch.ops, namespace)
