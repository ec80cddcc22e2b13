#!/usr/bin/env bash
# Check the hand-offs to other tools for real: a model exported here converts to GGUF with llama.cpp's own
# converter and gives llama.cpp the same tokens, logits and greedy text as transformers; lm-evaluation-harness
# (`--model hf`) gives the same bits per byte and answers as evaluate.py.
#
#   bash scripts/check_handoffs.sh        # in the project's venv; compiles llama-cpp-python (~10 min on 2 cores)
#
# llama.cpp's converter is not a pip package: it is taken from llama-cpp-python's source distribution
# (vendor/llama.cpp, the same llama.cpp the compiled library is built from) unless LLAMA_CPP_DIR points at
# a llama.cpp checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
$PYTHON -m pip install -q -r requirements.txt -r requirements-handoff.txt
if [ -z "${LLAMA_CPP_DIR:-}" ]; then
  SRC=${HANDOFF_CACHE:-$HOME/.cache/lmtrain/llama-cpp-python}
  VERSION=$(grep -oP '^llama-cpp-python==\K.*' requirements-handoff.txt)
  if [ ! -f "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    mkdir -p "$SRC"
    $PYTHON -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
    tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
  fi
  export LLAMA_CPP_DIR="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
LLAMA_CPP_DIR=$LLAMA_CPP_DIR $PYTHON -m pytest -q -rs -s tests/test_handoffs.py
