#!/usr/bin/env bash
# Lints the contracts with buf (from npm) and, given a git ref, checks them for
# breaking changes against it:  scripts/check_protos.sh [--against REF]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
buf=node_modules/.bin/buf

# buf cannot fetch googleapis offline: give it the copies that ship in googleapis-common-protos.
src=$("$python" -c 'import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parent.parent)')
rm -rf build/third_party && mkdir -p build/third_party/google/api build/third_party/google/rpc
cp "$src"/api/{annotations,http,field_behavior}.proto build/third_party/google/api/
cp "$src"/rpc/{status,error_details,code}.proto build/third_party/google/rpc/

"$buf" lint
echo "buf lint: ok"
if [ "${1:-}" = "--against" ]; then
  "$buf" breaking --against ".git#ref=${2:?usage: --against REF}"
  echo "buf breaking against ${2}: ok"
fi
