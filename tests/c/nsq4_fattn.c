// Runs the CPU backend's flash attention (ggml_flash_attn_ext) over a K and V cache written from Python (NSQ4 or NSQ3
// each), so that tests/test_simd.py can compare it with an attention computed in float64 from the reference
// dequantization, in decodes and prefills of several shapes, and check that a query row's result has the same bits
// alone, with a few other rows and in a whole batch.
//
//   nsq4_fattn DIR DK DV N_Q N_KV N_HEAD N_HEAD_KV SCALE SOFTCAP N_THREADS K_TYPE V_TYPE
//   nsq4_fattn --bench TYPE DK N_KV N_LIVE N_HEAD N_HEAD_KV N_THREADS REPS
//
// DIR holds q.f32 (N_HEAD x N_Q x DK), k.bin (N_HEAD_KV x N_KV rows of DK, in K_TYPE), v.bin (likewise, DV, in V_TYPE),
// mask.f32 (N_Q x N_KV, 0 or -inf); out.f32 (N_Q x N_HEAD x DV, ggml's layout of the result) is written there.
// --bench times one decoding query over a TYPE cache (K and V of TYPE, or of K/V for a TYPE "K/V", DK = DV) of random
// values, N_LIVE of whose N_KV cells the mask lets through (a run that wraps around, as a sliding window in its ring
// of cells), and prints TYPE and the median microseconds per call of REPS.
#define _POSIX_C_SOURCE 199309L // clock_gettime
#include "ggml.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static void fill_random(enum ggml_type type, struct ggml_tensor * t, int64_t n, int64_t row) {
    float * x = malloc(n*sizeof(float));
    for (int64_t i = 0; i < n; ++i) {
        x[i] = 2.0f*rand()/RAND_MAX - 1.0f;
    }
    if (type == GGML_TYPE_F32) {
        memcpy(t->data, x, n*sizeof(float));
    } else if (type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(x, t->data, n);
    } else {
        ggml_quantize_chunk(type, x, t->data, 0, n/row, row, NULL);
    }
    free(x);
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// the type named by the first len characters of name, or GGML_TYPE_COUNT
static enum ggml_type type_named(const char * name, size_t len) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((enum ggml_type) t);
        if (tn && strlen(tn) == len && strncmp(tn, name, len) == 0) { return (enum ggml_type) t; }
    }
    return GGML_TYPE_COUNT;
}

static int bench(char ** argv) {
    const char * slash = strchr(argv[0], '/');
    const enum ggml_type ktype = type_named(argv[0], slash ? (size_t) (slash - argv[0]) : strlen(argv[0]));
    const enum ggml_type vtype = slash ? type_named(slash + 1, strlen(slash + 1)) : ktype;
    if (ktype == GGML_TYPE_COUNT || vtype == GGML_TYPE_COUNT) {
        fprintf(stderr, "unknown type %s (a ggml type name, or K/V: two of them)\n", argv[0]);
        return 2;
    }
    const int64_t d = atoll(argv[1]), n_kv = atoll(argv[2]), n_live = atoll(argv[3]);
    const int64_t n_head = atoll(argv[4]), n_head_kv = atoll(argv[5]);
    const int n_threads = atoi(argv[6]), reps = atoi(argv[7]);

    struct ggml_init_params params = { /*.mem_size =*/ (size_t) 3*n_kv*n_head_kv*d*sizeof(float) + (64 << 20),
                                       /*.mem_buffer =*/ NULL, /*.no_alloc =*/ false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * q    = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, 1, n_head);
    struct ggml_tensor * k    = ggml_new_tensor_3d(ctx, ktype, d, n_kv, n_head_kv);
    struct ggml_tensor * v    = ggml_new_tensor_3d(ctx, vtype, d, n_kv, n_head_kv);
    struct ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, 1);
    srand(1);
    fill_random(GGML_TYPE_F32, q, d*n_head, d);
    fill_random(ktype, k, d*n_kv*n_head_kv, d);
    fill_random(vtype, v, d*n_kv*n_head_kv, d);
    ggml_fp16_t * mp = mask->data;
    for (int64_t i = 0; i < n_kv; ++i) {
        mp[i] = ggml_fp32_to_fp16((i - n_kv/3 + n_kv) % n_kv < n_live ? 0.0f : -INFINITY);
    }
    struct ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f/sqrtf((float) d), 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    // one threadpool for all the calls, as llama.cpp keeps one
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    struct ggml_cplan plan = ggml_graph_plan(gf, n_threads, tp);
    plan.work_data = malloc(plan.work_size);
    double * dt = malloc(reps*sizeof(double));
    for (int r = -reps/10; r < reps; ++r) { // the first tenth warms up
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "graph compute failed\n");
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (r >= 0) {
            dt[r] = (t1.tv_sec - t0.tv_sec)*1e6 + (t1.tv_nsec - t0.tv_nsec)*1e-3;
        }
    }
    qsort(dt, reps, sizeof(double), cmp_double);
    printf("%s %.2f\n", argv[0], dt[reps/2]);
    ggml_threadpool_free(tp);
    free(plan.work_data);
    free(dt);
    ggml_free(ctx);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc == 10 && strcmp(argv[1], "--bench") == 0) {
        ggml_cpu_init();
        return bench(argv + 2);
    }
    if (argc != 13) {
        fprintf(stderr, "usage: %s DIR DK DV N_Q N_KV N_HEAD N_HEAD_KV SCALE SOFTCAP N_THREADS K_TYPE V_TYPE\n"
                        "       %s --bench TYPE DK N_KV N_LIVE N_HEAD N_HEAD_KV N_THREADS REPS\n", argv[0], argv[0]);
        return 2;
    }
    const char * dir = argv[1];
    const int64_t dk = atoll(argv[2]), dv = atoll(argv[3]), n_q = atoll(argv[4]), n_kv = atoll(argv[5]);
    const int64_t n_head = atoll(argv[6]), n_head_kv = atoll(argv[7]);
    const float scale = (float) atof(argv[8]), softcap = (float) atof(argv[9]);
    const int n_threads = atoi(argv[10]);
    const enum ggml_type ktype = type_named(argv[11], strlen(argv[11]));
    const enum ggml_type vtype = type_named(argv[12], strlen(argv[12]));
    if (ktype == GGML_TYPE_COUNT || vtype == GGML_TYPE_COUNT) {
        fprintf(stderr, "unknown K or V type: %s, %s\n", argv[11], argv[12]);
        return 2;
    }

    ggml_cpu_init();
    // the work buffer of the tiled path comes out of the context too
    struct ggml_init_params params = { /*.mem_size =*/ (size_t) 512 << 20, /*.mem_buffer =*/ NULL, /*.no_alloc =*/ false };
    struct ggml_context * ctx = ggml_init(params);

    struct ggml_tensor * q    = ggml_new_tensor_3d(ctx, GGML_TYPE_F32,  dk, n_q,  n_head);
    struct ggml_tensor * k    = ggml_new_tensor_3d(ctx, ktype, dk, n_kv, n_head_kv);
    struct ggml_tensor * v    = ggml_new_tensor_3d(ctx, vtype, dv, n_kv, n_head_kv);
    struct ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16,  n_kv, n_q);

    read_into(dir, "q.f32", q->data, ggml_nbytes(q));
    read_into(dir, "k.bin", k->data, ggml_nbytes(k));
    read_into(dir, "v.bin", v->data, ggml_nbytes(v));
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
