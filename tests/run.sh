#!/usr/bin/env bash
# The project's test command. Installs nsq-local from this checkout (incremental after the first build), builds
# the llama.cpp tools and ggml tests from the same patched tree into build/tools (llama-server and ggml-rpc-server for
# tests/test_server.py, without the prebuilt web UI that upstream's configure step would download; and the Vulkan
# backend with test-backend-ops where it can be built), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${NSQ_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
python3 -m pip install -q ".[server,test]"

# The Vulkan backend joins the tools where glslc and the Vulkan headers are installed (NSQ_VULKAN=1 requires it,
# NSQ_VULKAN=0 leaves it out): tests/test_vulkan.py runs it on Mesa's lavapipe, a CPU-type device that ggml-vulkan
# skips unless GGML_VK_VISIBLE_DEVICES names it, so every other test sees the CPU alone.
vulkan=${NSQ_VULKAN:-auto}
if [ "$vulkan" = auto ]; then
    vulkan=0
    if command -v glslc >/dev/null && [ -f /usr/include/vulkan/vulkan.h ]; then vulkan=1; fi
fi
targets=(test-quantize-fns llama-perplexity llama-bench llama-server ggml-rpc-server)
vulkan_args=(-DGGML_VULKAN=OFF)
if [ "$vulkan" = 1 ]; then
    vulkan_args=(-DGGML_VULKAN=ON)
    targets+=(test-backend-ops)
fi

python3 ggml_patch/prepare.py --dest build/upstream
cmake -S build/upstream/vendor/llama.cpp -B build/tools -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    "${vulkan_args[@]}" ${NSQ_TOOLS_CMAKE_ARGS:-} > build/tools-configure.log
cmake --build build/tools -j "$jobs" --target "${targets[@]}"

exec python3 -m pytest -ra "$@"
