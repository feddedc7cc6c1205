#!/usr/bin/env bash
# Runs every test. Installs what the tests need first: the real local models (into .build/venv; a no-op once done).
set -euo pipefail
cd "$(dirname "$0")/.."
export EMC_VENV="${EMC_VENV:-$PWD/.build/venv}"
bash Sources/EdgeMatrixNode/Resources/setup-models.sh "$EMC_VENV"
swift build --build-tests
swift test --skip-build "$@"
