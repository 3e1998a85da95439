// Runs the CPU backend's NSQ4 and NSQ3 kernels (the SIMD ones where the build has them) on data from Python, so that
// tests/test_simd.py can compare them with nsq_local/reference.py on every architecture it can run.
//
//   nsq4_check TYPE X.f32 Y.f32 K OUT_PREFIX
//                                         TYPE nsq4 or nsq3: quantize X with its from_float, convert Y to its
//                                         vec_dot_type (F32: K.Q reads Q unrounded) and take the dot product of
//                                         every K-value row: writes OUT_PREFIX.q (X quantized), .y (Y as vec_dot
//                                         read it) and .dot (float32);
//                                         and .mad: each Y row plus its quantized X row times the row's first Y
//                                         value, by the fused V accumulation of flash attention; .doth and .madh:
//                                         the same for NSQ_HEADS query heads sharing each X row (grouped-query
//                                         attention's kernels), head h reading Y row (r + h) mod rows
//   nsq4_check --bench TYPE N REPS        from_float throughput of TYPE over N float32 values, in GB/s of input
#define _POSIX_C_SOURCE 199309L // clock_gettime
#include "ggml.h"
#include "ggml-cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// ggml-cpu's own (quants.h is internal): flash attention's V accumulation, y += dequantized x * v, and the K.Q and V
// accumulation of nh query heads that share one row, head h at y + h*ys
void ggml_vec_mad_nsq4(int n, float * y, const void * vx, float v);
void ggml_vec_dot_nsq4_f32_heads(int n, float * s, const void * vx, const float * y, size_t ys, int nh);
void ggml_vec_mad_nsq4_heads(int n, float * y, size_t ys, const void * vx, const float * v, int nh);
void ggml_vec_mad_nsq3(int n, float * y, const void * vx, float v);
void ggml_vec_dot_nsq3_f32_heads(int n, float * s, const void * vx, const float * y, size_t ys, int nh);
void ggml_vec_mad_nsq3_heads(int n, float * y, size_t ys, const void * vx, const float * v, int nh);

struct nsq_kernels {
    const char * name;
    enum ggml_type type;
    void (*mad)(int n, float * y, const void * vx, float v);
    void (*dot_heads)(int n, float * s, const void * vx, const float * y, size_t ys, int nh);
    void (*mad_heads)(int n, float * y, size_t ys, const void * vx, const float * v, int nh);
};

static const struct nsq_kernels KERNELS[] = {
    { "nsq4", GGML_TYPE_NSQ4, ggml_vec_mad_nsq4, ggml_vec_dot_nsq4_f32_heads, ggml_vec_mad_nsq4_heads },
    { "nsq3", GGML_TYPE_NSQ3, ggml_vec_mad_nsq3, ggml_vec_dot_nsq3_f32_heads, ggml_vec_mad_nsq3_heads },
};

enum { NSQ_HEADS = 5 }; // one group of four and one head more

static void * read_file(const char * path, size_t * size) {
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    *size = (size_t) ftell(f);
    fseek(f, 0, SEEK_SET);
    void * data = malloc(*size);
    if (fread(data, 1, *size, f) != *size) { perror(path); exit(1); }
    fclose(f);
    return data;
}

static void write_file(const char * prefix, const char * ext, const void * data, size_t size) {
    char path[4096];
    snprintf(path, sizeof(path), "%s.%s", prefix, ext);
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size) { perror(path); exit(1); }
    fclose(f);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9*ts.tv_nsec;
}

static int bench(const char * type_name, int64_t n, int reps) {
    enum ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((enum ggml_type) t);
        if (name && strcmp(name, type_name) == 0) { type = (enum ggml_type) t; }
    }
    if (type == GGML_TYPE_COUNT || !ggml_get_type_traits_cpu(type)->from_float) {
        fprintf(stderr, "no CPU from_float for type %s\n", type_name);
        return 1;
    }
    float * x = malloc(n*sizeof(float));
    void  * q = malloc(ggml_row_size(type, n));
    srand(1);
    for (int64_t i = 0; i < n; ++i) {
        x[i] = (float) rand() / RAND_MAX - 0.5f;
    }
    ggml_from_float_t from_float = ggml_get_type_traits_cpu(type)->from_float;
    from_float(x, q, n); // warm-up
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const double t0 = now_s();
        from_float(x, q, n);
        const double dt = now_s() - t0;
        best = dt < best ? dt : best;
    }
    printf("%s %.4f\n", type_name, n*sizeof(float)/best/1e9);
    free(x);
    free(q);
    return 0;
}

int main(int argc, char ** argv) {
    ggml_cpu_init();
    if (argc == 5 && strcmp(argv[1], "--bench") == 0) {
        return bench(argv[2], atoll(argv[3]), atoi(argv[4]));
    }
    if (argc != 6) {
        fprintf(stderr, "usage: %s nsq4|nsq3 X.f32 Y.f32 K OUT_PREFIX | --bench TYPE N REPS\n", argv[0]);
        return 2;
    }
    const struct nsq_kernels * kern = NULL;
    for (size_t i = 0; i < sizeof(KERNELS)/sizeof(KERNELS[0]); ++i) {
        if (strcmp(argv[1], KERNELS[i].name) == 0) { kern = &KERNELS[i]; }
    }
    if (!kern) {
        fprintf(stderr, "unknown type %s: this check runs nsq4 or nsq3\n", argv[1]);
        return 2;
    }
    argv++;
    size_t nx, ny;
    float * x = read_file(argv[1], &nx);
    float * y = read_file(argv[2], &ny);
    const int64_t k = atoll(argv[3]);
    const int64_t n = nx / sizeof(float);
    if (nx != ny || k <= 0 || k % 64 != 0 || n % k != 0) {
        fprintf(stderr, "X and Y must hold the same number of float32 values, rows of K (a multiple of 64)\n");
        return 2;
    }
    const int64_t nrows = n / k;
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(kern->type);
    if (traits->vec_dot_type != GGML_TYPE_F32) {
        fprintf(stderr, "%s's vec_dot_type is %s, this check expects f32\n", kern->name,
                ggml_type_name(traits->vec_dot_type));
        return 1;
    }
    const struct ggml_type_traits_cpu * vdt = ggml_get_type_traits_cpu(traits->vec_dot_type);
    const size_t xrow = ggml_row_size(kern->type, k);
    const size_t yrow = ggml_row_size(traits->vec_dot_type, k);
    char  * qx  = malloc(nrows*xrow);
    char  * qy  = malloc(nrows*yrow);
    float * dot = malloc(nrows*sizeof(float));
    float * mad = malloc(nx);
    memcpy(mad, y, nx);
    float * doth = malloc(NSQ_HEADS*nrows*sizeof(float));
    float * madh = malloc(NSQ_HEADS*nx);
    for (int64_t r = 0; r < nrows; ++r) {
        traits->from_float(x + r*k, qx + r*xrow, k);
        vdt->from_float(y + r*k, qy + r*yrow, k);
        traits->vec_dot((int) k, &dot[r], 0, qx + r*xrow, 0, qy + r*yrow, 0, 1);
        kern->mad((int) k, mad + r*k, qx + r*xrow, y[r*k]);
    }
    for (int64_t r = 0; r < nrows; ++r) {
        float * heads = madh + r*NSQ_HEADS*k;
        float   v[NSQ_HEADS];
        for (int h = 0; h < NSQ_HEADS; ++h) {
            memcpy(heads + h*k, y + (r + h) % nrows * k, k*sizeof(float));
            v[h] = heads[h*k];
        }
        kern->dot_heads((int) k, doth + r*NSQ_HEADS, qx + r*xrow, heads, k, NSQ_HEADS);
        kern->mad_heads((int) k, heads, k, qx + r*xrow, v, NSQ_HEADS);
    }
    write_file(argv[4], "q", qx, nrows*xrow);
    write_file(argv[4], "y", qy, nrows*yrow);
    write_file(argv[4], "dot", dot, nrows*sizeof(float));
    write_file(argv[4], "mad", mad, nx);
    write_file(argv[4], "doth", doth, NSQ_HEADS*nrows*sizeof(float));
    write_file(argv[4], "madh", madh, NSQ_HEADS*nx);
    return 0;
}
