// Runs NSQ4's Metal block functions, the patched kernels/nsq4.h without its includes (nsq4_metal_blocks.h),
// on the host. Protocol (binary, stdin -> stdout):
//   q <n> then n*64 float32  -> n*34 bytes: quantize_nsq4, block by block
//   d <n> then n*34 bytes    -> per block: 64 float32 from dequantize_nsq4<float4x4> (il = 0..3),
//                               64 float32 from dequantize_nsq4_t4<float4> (il = 0..15),
//                               64 float16 from dequantize_nsq4<half4x4>, 64 float16 from dequantize_nsq4_t4<half4>
//   h <n> then n float32     -> n uint16: nsq4_fp16_bits, the conversion that stores d
#include <cstdio>
#include <vector>

#define MAX(x, y) ((x) > (y) ? (x) : (y))
#define MIN(x, y) ((x) < (y) ? (x) : (y))

#include <metal_stdlib>

#define GGML_COMMON_DECL_METAL
#define GGML_COMMON_IMPL_METAL
#define GGML_METAL_NSQ4 // as NSQ4's Metal libraries are compiled: ggml-common.h declares NSQ4 to Metal only then
#include "ggml-common.h"

#include "nsq4_metal_blocks.h"

template <typename T>
static void put(const T * p, size_t n) {
    fwrite(p, sizeof(T), n, stdout);
}

int main() {
    char op;
    long n;
    if (fread(&op, 1, 1, stdin) != 1 || fread(&n, sizeof(n), 1, stdin) != 1) {
        return 2;
    }
    if (op == 'q') {
        std::vector<float> x(64*n);
        if (fread(x.data(), sizeof(float), x.size(), stdin) != x.size()) {
            return 2;
        }
        for (long i = 0; i < n; ++i) {
            block_nsq4 b;
            quantize_nsq4(x.data() + 64*i, b);
            put((const unsigned char *) &b, sizeof(b));
        }
        return 0;
    }
    if (op == 'd') {
        std::vector<block_nsq4> b(n);
        if (fread(b.data(), sizeof(block_nsq4), n, stdin) != (size_t) n) {
            return 2;
        }
        for (long i = 0; i < n; ++i) {
            for (short il = 0; il < 4; ++il) {
                float4x4 r;
                dequantize_nsq4(&b[i], il, r);
                for (int k = 0; k < 4; ++k) put(r[k].v, 4);
            }
            for (short il = 0; il < 16; ++il) {
                float4 r;
                dequantize_nsq4_t4(&b[i], il, r);
                put(r.v, 4);
            }
            for (short il = 0; il < 4; ++il) {
                half4x4 r;
                dequantize_nsq4(&b[i], il, r);
                for (int k = 0; k < 4; ++k) put(r[k].v, 4);
            }
            for (short il = 0; il < 16; ++il) {
                half4 r;
                dequantize_nsq4_t4(&b[i], il, r);
                put(r.v, 4);
            }
        }
        return 0;
    }
    if (op == 'h') {
        std::vector<float> x(n);
        if (fread(x.data(), sizeof(float), x.size(), stdin) != x.size()) {
            return 2;
        }
        for (float f : x) {
            const ushort h = nsq4_fp16_bits(f);
            put(&h, 1);
        }
        return 0;
    }
    return 2;
}
