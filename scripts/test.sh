#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then runs every check: generated-code drift,
# buf lint, and the test suite (unit, service, mesh with real Envoy). Extra arguments
# go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> generated code drift"
.venv/bin/python scripts/codegen.py --check
echo "==> buf lint"
scripts/check_protos.sh
echo "==> pytest"
.venv/bin/python -m pytest "$@"
