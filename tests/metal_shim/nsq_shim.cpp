// Runs the NSQ family's Metal block functions, the patched kernels/nsq4.h and kernels/nsq3.h without their includes
// (nsq_metal_blocks.h), on the host. Protocol (binary, stdin -> stdout), for NSQ4 (q, d) and NSQ3 (Q, D):
//   q|Q <n> then n*64 float32  -> n blocks (34 | 26 bytes each): quantize_nsq4 | quantize_nsq3, block by block
//   d|D <n> then n blocks      -> per block: 64 float32 from dequantize_<type><float4x4> (il = 0..3),
//                                 64 float32 from dequantize_<type>_t4<float4> (il = 0..15),
//                                 64 float16 from dequantize_<type><half4x4>, 64 float16 from dequantize_<type>_t4<half4>
//   h <n> then n float32       -> n uint16: nsq_fp16_bits, the conversion that stores d
#include <cstdio>
#include <vector>

#define MAX(x, y) ((x) > (y) ? (x) : (y))
#define MIN(x, y) ((x) < (y) ? (x) : (y))

#include <metal_stdlib>

#define GGML_COMMON_DECL_METAL
#define GGML_COMMON_IMPL_METAL
#define GGML_METAL_NSQ // as NSQ4's Metal libraries are compiled: ggml-common.h declares NSQ4 and NSQ3 to Metal only then
#include "ggml-common.h"

#include "nsq_metal_blocks.h"

template <typename T>
static void put(const T * p, size_t n) {
    fwrite(p, sizeof(T), n, stdout);
}

template <typename block, void (*quantize)(const float *, block &)>
static int quantize_blocks(long n) {
    std::vector<float> x(64*n);
    if (fread(x.data(), sizeof(float), x.size(), stdin) != x.size()) {
        return 2;
    }
    for (long i = 0; i < n; ++i) {
        block b;
        quantize(x.data() + 64*i, b);
        put((const unsigned char *) &b, sizeof(b));
    }
    return 0;
}

template <typename block,
          void (*deq_f)(const block *, short, float4x4 &), void (*deq_f_t4)(const block *, short, float4 &),
          void (*deq_h)(const block *, short, half4x4 &),  void (*deq_h_t4)(const block *, short, half4 &)>
static int dequantize_blocks(long n) {
    std::vector<block> b(n);
    if (fread(b.data(), sizeof(block), n, stdin) != (size_t) n) {
        return 2;
    }
    for (long i = 0; i < n; ++i) {
        for (short il = 0; il < 4; ++il) {
            float4x4 r;
            deq_f(&b[i], il, r);
            for (int k = 0; k < 4; ++k) put(r[k].v, 4);
        }
        for (short il = 0; il < 16; ++il) {
            float4 r;
            deq_f_t4(&b[i], il, r);
            put(r.v, 4);
        }
        for (short il = 0; il < 4; ++il) {
            half4x4 r;
            deq_h(&b[i], il, r);
            for (int k = 0; k < 4; ++k) put(r[k].v, 4);
        }
        for (short il = 0; il < 16; ++il) {
            half4 r;
            deq_h_t4(&b[i], il, r);
            put(r.v, 4);
        }
    }
    return 0;
}

int main() {
    char op;
    long n;
    if (fread(&op, 1, 1, stdin) != 1 || fread(&n, sizeof(n), 1, stdin) != 1) {
        return 2;
    }
    switch (op) {
        case 'q': return quantize_blocks<block_nsq4, quantize_nsq4>(n);
        case 'Q': return quantize_blocks<block_nsq3, quantize_nsq3>(n);
        case 'd': return dequantize_blocks<block_nsq4, dequantize_nsq4<float4x4>, dequantize_nsq4_t4<float4>,
                                           dequantize_nsq4<half4x4>, dequantize_nsq4_t4<half4>>(n);
        case 'D': return dequantize_blocks<block_nsq3, dequantize_nsq3<float4x4>, dequantize_nsq3_t4<float4>,
                                           dequantize_nsq3<half4x4>, dequantize_nsq3_t4<half4>>(n);
        case 'h': {
            std::vector<float> x(n);
            if (fread(x.data(), sizeof(float), x.size(), stdin) != x.size()) {
                return 2;
            }
            for (float f : x) {
                const ushort h = nsq_fp16_bits(f);
                put(&h, 1);
            }
            return 0;
        }
    }
    return 2;
}
