#!/usr/bin/env bash
# The README's test command: installs what the tests need, lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --tests
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest "$@"
