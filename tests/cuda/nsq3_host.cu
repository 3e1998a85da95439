// Runs the NSQ3 block functions of ggml-cuda/nsq3.cuh on the host, so that tests/test_cuda.py can compare them with
// nsq_local/reference.py: the quantizer and dequantizer that SET_ROWS, CPY, GET_ROWS and the f16 conversion call on
// the GPU, and the code unpacking of the flash-attention kernels (4 codes per int for K, 2 or 4 for V).
//
//     nsq3_host IN OUT_BLOCKS OUT_VALUES OUT_CODES
//
// IN: float32 values (a multiple of 64); OUT_BLOCKS: the 26-byte blocks; OUT_VALUES: those blocks dequantized;
// OUT_CODES: per block, its 64 codes as nsq3_codes_packed<4> gives them, then as nsq3_codes_packed<2> does.

// declarations as ggml-cuda sees them (ggml_half is CUDA's half), tables as host arrays
#define GGML_COMMON_DECL_CUDA
#define GGML_COMMON_IMPL_CPP
#include "ggml-common.h"
#include "ggml-cuda/nsq3.cuh"

#include "host_io.h"

#include <cstdio>
#include <cstring>
#include <vector>

template <int ne>
static void unpack_codes(const block_nsq3 * x, uint8_t * codes) {
    for (int j = 0; j < QK_NSQ3; j += ne) {
        const uint32_t q = nsq3_codes_packed<ne>(x, j);
        for (int l = 0; l < ne; ++l) {
            codes[j + l] = (q >> (8*l)) & 0xFF;
        }
    }
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s IN OUT_BLOCKS OUT_VALUES OUT_CODES\n", argv[0]);
        return 2;
    }
    const std::vector<char> in = read_file(argv[1]);
    if (in.empty() || in.size() % (QK_NSQ3*sizeof(float)) != 0) {
        fprintf(stderr, "%s: expected a non-empty multiple of %d float32 values\n", argv[1], QK_NSQ3);
        return 2;
    }
    const size_t nb = in.size() / (QK_NSQ3*sizeof(float));
    std::vector<float> x(nb*QK_NSQ3);
    memcpy(x.data(), in.data(), in.size());

    std::vector<block_nsq3> blocks(nb);
    std::vector<float> y(nb*QK_NSQ3);
    std::vector<uint8_t> codes(nb*2*QK_NSQ3);
    for (size_t ib = 0; ib < nb; ++ib) {
        quantize_block_nsq3(x.data() + ib*QK_NSQ3, &blocks[ib], kvalues_nsq3, kscales_nsq3);
        for (int iqs = 0; iqs < QK_NSQ3/2; ++iqs) {
            const float2 v = dequantize_pair_nsq3(&blocks[ib], iqs, kvalues_nsq3);
            y[ib*QK_NSQ3 + iqs]             = v.x;
            y[ib*QK_NSQ3 + iqs + QK_NSQ3/2] = v.y;
        }
        unpack_codes<4>(&blocks[ib], codes.data() + ib*2*QK_NSQ3);
        unpack_codes<2>(&blocks[ib], codes.data() + ib*2*QK_NSQ3 + QK_NSQ3);
    }
    static_assert(sizeof(block_nsq3) == 26, "block_nsq3 must be packed as on the CPU");
    if (!write_file(argv[2], blocks.data(), nb*sizeof(block_nsq3)) || !write_file(argv[3], y.data(), y.size()*sizeof(float)) ||
        !write_file(argv[4], codes.data(), codes.size())) {
        fprintf(stderr, "could not write the outputs\n");
        return 1;
    }
    return 0;
}
