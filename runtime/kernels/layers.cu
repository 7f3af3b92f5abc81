// Embedding rows, RMSNorm, RoPE, the KV-cache store and GLU. Positions are read from device memory (`pos`), so
// a captured decode step replays at every position.

// out[t, :] = scale · the table's row row_of[ids[t]], (tokens, d); one thread per BLOCK elements. row_of maps every
// token id of the vocabulary to its row in this table, or to -1 where another table holds it (a table with hot
// rows is two tables, spec/FORMAT.md §3.4): those tokens' rows are left to that table's launch. An id outside the
// vocabulary gives a row of NaN instead of reading outside the table.
template <class Table>
__global__ void embed(const unsigned char* __restrict__ table, long long row_bytes, const int* __restrict__ row_of,
                      int vocab, const int* __restrict__ ids, int tokens, int d, float scale, float* __restrict__ out) {
    const int per_row = d / Table::BLOCK;
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)tokens * per_row) return;
    const int t = (int)(idx / per_row), b = (int)(idx % per_row);
    const int id = ids[t];
    float v[Table::BLOCK];
    if (id >= 0 && id < vocab) {
        const int row = row_of[id];
        if (row < 0) return;
        Table::load(table + row * row_bytes, b, v);
    } else {
        for (int i = 0; i < Table::BLOCK; ++i) v[i] = __int_as_float(0x7fc00000);
    }
    for (int i = 0; i < Table::BLOCK; ++i) out[(long long)t * d + b * Table::BLOCK + i] = v[i] * scale;
}

// out = x / sqrt(mean(x²) + eps) · w over rows of length d; one block per row (in place allowed).
__global__ void rms_norm(const float* x, const float* __restrict__ w, float* out, int d, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * d;
    float ss = 0.f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) ss += xr[k] * xr[k];
    ss = block_reduce<false>(ss, scratch);
    const float inv = (float)(1.0 / sqrt((double)ss / d + (double)eps));
    float* orow = out + (long long)blockIdx.x * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) orow[k] = xr[k] * inv * w[k];
}

// cos/sin (tokens, half) of rotate-half RoPE at positions pos[0] + t: angle = float32(position) · inv_freq in
// float32, then cos and sin in float64 rounded to float32 (as runtime/model.py builds its tables).
__global__ void rope_table(const int* __restrict__ pos, const float* __restrict__ inv_freq, int half, int tokens,
                           float* __restrict__ cos_out, float* __restrict__ sin_out) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= tokens * half) return;
    const int t = idx / half, k = idx % half;
    const float angle = __fmul_rn((float)(pos[0] + t), inv_freq[k]);
    cos_out[idx] = (float)cos((double)angle);
    sin_out[idx] = (float)sin((double)angle);
}

// Rotate-half RoPE (Hugging Face layout) of x (tokens, heads, d) with cos/sin (tokens, d/2); in place allowed.
__global__ void rope(const float* x, const float* __restrict__ cos_t, const float* __restrict__ sin_t, float* out,
                     int tokens, int heads, int d) {
    const int half = d / 2;
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)tokens * heads * half) return;
    const int k = (int)(idx % half), t = (int)(idx / half / heads);
    const long long base = idx / half * d;
    const float a = x[base + k], b = x[base + k + half];
    const float c = cos_t[t * half + k], s = sin_t[t * half + k];
    out[base + k] = a * c - b * s;
    out[base + k + half] = b * c + a * s;
}

// Keys and values (tokens, kv_heads, d) into the caches (layers, kv_heads, n_ctx, d) at positions pos[0] + t
// of `layer`; positions past the cache are not written.
__global__ void kv_store(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ cache_k,
                         float* __restrict__ cache_v, int layer, const int* __restrict__ pos, int tokens,
                         int kv_heads, int d, int n_ctx) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)tokens * kv_heads * d) return;
    const int e = (int)(idx % d), h = (int)(idx / d % kv_heads), t = (int)(idx / d / kv_heads);
    const int p = pos[0] + t;
    if (p >= n_ctx) return;
    const long long dst = (((long long)layer * kv_heads + h) * n_ctx + p) * d + e;
    cache_k[dst] = k[idx];
    cache_v[dst] = v[idx];
}

// out = act(gate) · up, act = silu (GELU_TANH false) or tanh-approximated GELU.
template <bool GELU_TANH>
__global__ void glu(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out,
                    long long count) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= count) return;
    const float g = gate[idx];
    const float a = GELU_TANH ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                              : g / (1.f + expf(-g));
    out[idx] = a * up[idx];
}
