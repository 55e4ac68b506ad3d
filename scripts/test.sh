#!/usr/bin/env bash
# The README's test command: installs what the tests need, lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --tests
python3 -m ruff check .
python3 -m ruff format --check .
# Two workers (BEIT3_TEST_WORKERS; 0 runs in this process): most tests start processes and wait on them,
# so two cores run two modules at once (tests/conftest.py keeps a module, and all of Slurm, on one worker).
python3 -m pytest -n "${BEIT3_TEST_WORKERS:-2}" --dist loadgroup "$@"
