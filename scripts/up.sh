#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then starts the local mesh: `aimesh up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/aimesh up "$@"
