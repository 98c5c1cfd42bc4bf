#!/usr/bin/env bash
# Create or update the project's virtual environment at .venv (idempotent; a no-op when up to date).
#
# torch/torchvision come from the wheels on this fleet's disk (pip finds them through its configured
# find-links); everything else from the package index. Re-runs are instant unless pyproject.toml or this
# script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "setup: sorter needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
echo "setup: installing torch 2.14.1 / torchvision 0.29.1 (about a minute on a fresh machine)" >&2
"${pip[@]}" install -q torch==2.14.1 torchvision==0.29.1 2> >(grep -v "^WARNING: Location" >&2)
echo "setup: installing sorter and its dev tools" >&2
"${pip[@]}" install -q -e '.[dev]' 2> >(grep -v "^WARNING: Location" >&2)
rm -f .venv/.setup-*
touch "$stamp"
echo "setup: ready (.venv/bin/sorter)" >&2
