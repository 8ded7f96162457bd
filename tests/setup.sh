#!/usr/bin/env bash
# Installs everything the test suite uses, so that `bash tests/setup.sh && python -m pytest -q` runs all of it:
#   - torch (the CPU build this machine has on disk comes first, so pip never swaps in a CUDA build) and the
#     package with its test extras;
#   - Debian's Chromium for the web page's browser tests (apt-get, when root or passwordless sudo allow it;
#     otherwise those tests skip and say why);
#   - vLLM's CPU build in its own venv for the `vllm`-marked tests (.ci/vllm-env.sh; cached under
#     ${QWENLM_CI_CACHE:-$HOME/.cache/qwenlm-ci}, ~3.5 GB the first time, ~2 s afterwards).
# Each step is idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

pip install -q torch==2.13.0
pip install -q -e ".[test]"

if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  fi
  if [ "$sudo" = "none" ]; then
    echo "tests/setup.sh: not root and no passwordless sudo: skipping Chromium (the browser tests will skip)" >&2
  else
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
fi

bash .ci/vllm-env.sh >/dev/null
