// Runs the NSQ4 block functions of ggml-cuda/nsq4.cuh, the ones SET_ROWS, CPY, GET_ROWS and the f16 conversion
// call on the GPU, on the host, so that tests/test_cuda.py can compare them with nsq_local/reference.py.
//
//     nsq4_host IN OUT_BLOCKS OUT_VALUES
//
// IN: float32 values (a multiple of 64); OUT_BLOCKS: the 34-byte blocks; OUT_VALUES: those blocks dequantized.

// declarations as ggml-cuda sees them (ggml_half is CUDA's half), tables as host arrays
#define GGML_COMMON_DECL_CUDA
#define GGML_COMMON_IMPL_CPP
#include "ggml-common.h"
#include "ggml-cuda/nsq4.cuh"

#include "host_io.h"

#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s IN OUT_BLOCKS OUT_VALUES\n", argv[0]);
        return 2;
    }
    const std::vector<char> in = read_file(argv[1]);
    if (in.empty() || in.size() % (QK_NSQ4*sizeof(float)) != 0) {
        fprintf(stderr, "%s: expected a non-empty multiple of %d float32 values\n", argv[1], QK_NSQ4);
        return 2;
    }
    const size_t nb = in.size() / (QK_NSQ4*sizeof(float));
    std::vector<float> x(nb*QK_NSQ4);
    memcpy(x.data(), in.data(), in.size());

    std::vector<block_nsq4> blocks(nb);
    std::vector<float> y(nb*QK_NSQ4);
    for (size_t ib = 0; ib < nb; ++ib) {
        quantize_block_nsq4(x.data() + ib*QK_NSQ4, &blocks[ib], kvalues_nsq4, kscales_nsq4);
        for (int iqs = 0; iqs < QK_NSQ4/2; ++iqs) {
            const float2 v = dequantize_pair_nsq4(&blocks[ib], iqs, kvalues_nsq4);
            y[ib*QK_NSQ4 + iqs]             = v.x;
            y[ib*QK_NSQ4 + iqs + QK_NSQ4/2] = v.y;
        }
    }
    static_assert(sizeof(block_nsq4) == 34, "block_nsq4 must be packed as on the CPU");
    if (!write_file(argv[2], blocks.data(), nb*sizeof(block_nsq4)) || !write_file(argv[3], y.data(), y.size()*sizeof(float))) {
        fprintf(stderr, "could not write the outputs\n");
        return 1;
    }
    return 0;
}
