#!/usr/bin/env bash
# Install Lepton AutoML into ./.venv. PyTorch goes first and pinned (torch 2.14.1 + torchvision
# 0.29.1: the pair that imports together and installs from local disk on our machines), so no
# later requirement can pull another torch build. `--test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
  # The environment takes about 7 GB (PyTorch's CUDA build): say so now rather than fail inside pip.
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  if [ -n "$free_gb" ] && [ "$free_gb" -lt 9 ]; then
    echo "install.sh: only ${free_gb} GB free on this disk; .venv needs about 7 GB and pip's temporary files more. Free some space (or clone elsewhere) and run it again." >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's exit status is kept; only its notes about absent local mirror folders are filtered out.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -c constraints.txt -e ".${extras}"
if [ -n "$extras" ]; then
  # The example third-party plugin: tests find it through its entry point, like any other.
  pip_install --no-deps --no-build-isolation -e examples/lepton-audio
fi
.venv/bin/python -c "import torch, torchvision, timm, lepton_automl; print('lepton-automl', lepton_automl.__version__, 'torch', torch.__version__)"
