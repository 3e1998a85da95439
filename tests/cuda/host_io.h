#pragma once

// File input and output of the host programs in this directory (nsq4_host.cu, nsq3_host.cu).

#include <cstdio>
#include <vector>

static std::vector<char> read_file(const char * path) {
    std::vector<char> data;
    FILE * f = fopen(path, "rb");
    if (!f) {
        return data;
    }
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) {
        data.insert(data.end(), buf, buf + n);
    }
    fclose(f);
    return data;
}

static bool write_file(const char * path, const void * data, size_t size) {
    FILE * f = fopen(path, "wb");
    if (!f) {
        return false;
    }
    const bool ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok;
}
