#!/usr/bin/env bash
# The project's test command. Installs nsq-local from this checkout (incremental after the first build), builds
# the llama.cpp tools and ggml tests from the same patched tree into build/tools (llama-server and ggml-rpc-server for
# tests/test_server.py, without the prebuilt web UI that upstream's configure step would download), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${NSQ_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
python3 -m pip install -q ".[server,test]"

python3 ggml_patch/prepare.py --dest build/upstream
cmake -S build/upstream/vendor/llama.cpp -B build/tools -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    ${NSQ_TOOLS_CMAKE_ARGS:-} > build/tools-configure.log
cmake --build build/tools -j "$jobs" --target test-quantize-fns llama-perplexity llama-bench \
    llama-server ggml-rpc-server

exec python3 -m pytest -ra "$@"
