#!/usr/bin/env bash
# Check that every prefix of the series applies and builds: for k = 1..N, the pristine sdist plus the first k
# patches is prepared into one tree (only the files that differ from the previous prefix are rewritten, so each
# build is incremental), the CPU configuration of ggml, libllama and the tools the patches touch is built, and the
# Python package is byte-compiled. The CUDA and Metal patches are built here as part of the CPU configuration only:
# no later patch touches their files, so tests/test_cuda.py and tests/test_metal_shim.py, which check the full
# tree's CUDA and Metal sources, check those prefixes' too.
#
#   ggml_patch/check_prefixes.sh [WORK_DIR]      # default: build/prefixes; 23 minutes on 2 cores (2026-12-07)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(realpath -m "${1:-$here/../build/prefixes}")
jobs=${NSQ_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
mapfile -t patches < <(grep -v '^\s*\(#\|$\)' "$here/series")
mkdir -p "$work"
copy="$work/ggml_patch"
tree="$work/tree"
build="$work/build"
for k in $(seq 1 ${#patches[@]}); do
    rm -rf "$copy" && cp -r "$here" "$copy"
    printf '%s\n' "${patches[@]:0:$k}" > "$copy/series"
    echo "== $k/${#patches[@]}: ${patches[$((k - 1))]}"
    python3 "$copy/prepare.py" --dest "$tree" > "$work/prepare.log" 2>&1 || { cat "$work/prepare.log"; exit 1; }
    if [ ! -f "$build/build.ninja" ]; then
        cmake -S "$tree/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
            -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
            -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$work/configure.log"
    fi
    cmake --build "$build" -j "$jobs" --target ggml llama test-quantize-fns test-backend-ops llama-perplexity \
        llama-bench ggml-rpc-server > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
    python3 -m compileall -q "$tree/llama_cpp" > /dev/null
    echo "   applies and builds"
done
echo "every prefix of the ${#patches[@]} patches applies and builds"
