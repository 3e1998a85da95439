// Type-checks the NSQ family's Metal kernels (NSQ4's and NSQ3's), the patched kernels/nsq.metal without its
// includes (nsq_metal_kernels.h), on the host (g++ -fsyntax-only): the names, argument structs (ggml-metal-impl.h)
// and types they use, and every instantiation of their templates. Only the Metal compiler can check the rest
// (attributes, address spaces).
#include <metal_stdlib>

#define kernel

template <typename T>
struct vec3 {
    T x, y, z;
    T operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }
};
typedef vec3<uint>   uint3;
typedef vec3<ushort> ushort3;

#define MAX(x, y) ((x) > (y) ? (x) : (y))
#define MIN(x, y) ((x) < (y) ? (x) : (y))

#include "ggml-metal-impl.h"

#define GGML_COMMON_DECL_METAL
#define GGML_COMMON_IMPL_METAL
#define GGML_METAL_NSQ
#include "ggml-common.h"

#include "nsq_metal_blocks.h"
#include "nsq_metal_kernels.h"
