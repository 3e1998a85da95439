// Runs the CPU backend's flash attention (ggml_flash_attn_ext) over an NSQ4 K and V written from Python, so that
// tests/test_simd.py can compare every CPU path NSQ4 takes with an attention computed in float64 from the reference
// dequantization: decode with a long cache (split-KV path), decode with a short one (one_chunk), prefill (tiled).
//
//   nsq4_fattn DIR DK DV N_Q N_KV N_HEAD N_HEAD_KV SCALE SOFTCAP N_THREADS
//
// DIR holds q.f32 (N_HEAD x N_Q x DK), k.nsq4 (N_HEAD_KV x N_KV rows of DK), v.nsq4 (likewise, DV), mask.f32
// (N_Q x N_KV, 0 or -inf); out.f32 (N_Q x N_HEAD x DV, ggml's layout of the result) is written there.
#include "ggml.h"
#include "ggml-cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void read_into(const char * dir, const char * name, void * dst, size_t size) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    if ((size_t) ftell(f) != size) {
        fprintf(stderr, "%s holds %ld bytes, the shapes given need %zu\n", path, ftell(f), size);
        exit(2);
    }
    fseek(f, 0, SEEK_SET);
    if (fread(dst, 1, size, f) != size) { perror(path); exit(1); }
    fclose(f);
}

int main(int argc, char ** argv) {
    if (argc != 11) {
        fprintf(stderr, "usage: %s DIR DK DV N_Q N_KV N_HEAD N_HEAD_KV SCALE SOFTCAP N_THREADS\n", argv[0]);
        return 2;
    }
    const char * dir = argv[1];
    const int64_t dk = atoll(argv[2]), dv = atoll(argv[3]), n_q = atoll(argv[4]), n_kv = atoll(argv[5]);
    const int64_t n_head = atoll(argv[6]), n_head_kv = atoll(argv[7]);
    const float scale = (float) atof(argv[8]), softcap = (float) atof(argv[9]);
    const int n_threads = atoi(argv[10]);

    ggml_cpu_init();
    // the work buffer of the tiled path comes out of the context too
    struct ggml_init_params params = { /*.mem_size =*/ (size_t) 512 << 20, /*.mem_buffer =*/ NULL, /*.no_alloc =*/ false };
    struct ggml_context * ctx = ggml_init(params);

    struct ggml_tensor * q    = ggml_new_tensor_3d(ctx, GGML_TYPE_F32,  dk, n_q,  n_head);
    struct ggml_tensor * k    = ggml_new_tensor_3d(ctx, GGML_TYPE_NSQ4, dk, n_kv, n_head_kv);
    struct ggml_tensor * v    = ggml_new_tensor_3d(ctx, GGML_TYPE_NSQ4, dv, n_kv, n_head_kv);
    struct ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16,  n_kv, n_q);

    read_into(dir, "q.f32", q->data, ggml_nbytes(q));
    read_into(dir, "k.nsq4", k->data, ggml_nbytes(k));
    read_into(dir, "v.nsq4", v->data, ggml_nbytes(v));
    float * mask32 = malloc(n_q*n_kv*sizeof(float));
    read_into(dir, "mask.f32", mask32, n_q*n_kv*sizeof(float));
    ggml_fp32_to_fp16_row(mask32, mask->data, n_q*n_kv);
    free(mask32);

    struct ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, 0.0f, softcap);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        return 1;
    }

    char path[4096];
    snprintf(path, sizeof(path), "%s/out.f32", dir);
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(out->data, 1, ggml_nbytes(out), f) != ggml_nbytes(out)) { perror(path); return 1; }
    fclose(f);
    ggml_free(ctx);
    return 0;
}
