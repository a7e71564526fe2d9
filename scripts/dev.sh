#!/usr/bin/env bash
# Set up a virtual environment (once) and run the main job or the tests.
#   bash scripts/dev.sh demo    # the end-to-end demo
#   bash scripts/dev.sh test    # the test suite (fast set; `test -m slow` for the slow one)
# torch is pinned to 2.13.0 (a CPU build) through scripts/constraints.txt: an unpinned torch pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_SOUP_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.hf_soup-installed"
wanted="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r scripts/constraints.txt
  "$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
  echo "$wanted" > "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command="${1:-test}"
shift || true
case "$command" in
  demo) exec "$VENV/bin/python" scripts/demo.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
