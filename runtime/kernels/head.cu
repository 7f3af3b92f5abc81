// The output head and token selection on the device.

// logits (tokens, vocab) = x (tokens, d) · tableᵀ: one warp per table row, lanes striding its BLOCK-element
// pieces, HEAD_TOKENS tokens per pass over the row. Row r's logit goes to column col_of[r]: the identity for a
// table of the whole vocabulary, the token ids of its rows for either part of a table with hot rows.
#define HEAD_TOKENS 4

template <class Table>
__global__ void head(const unsigned char* __restrict__ table, long long row_bytes, int rows,
                     const int* __restrict__ col_of, int vocab, int d, const float* __restrict__ x, int tokens,
                     float* __restrict__ out) {
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps leave together
    const unsigned char* r = table + row * row_bytes;
    const int col = col_of[row];
    const int pieces = d / Table::BLOCK;
    for (int t0 = 0; t0 < tokens; t0 += HEAD_TOKENS) {
        float acc[HEAD_TOKENS];
        for (int tt = 0; tt < HEAD_TOKENS; ++tt) acc[tt] = 0.f;
        for (int b = lane; b < pieces; b += 32) {
            float v[Table::BLOCK];
            Table::load(r, b, v);
            for (int tt = 0; tt < HEAD_TOKENS && t0 + tt < tokens; ++tt) {
                const float* xr = x + (long long)(t0 + tt) * d + b * Table::BLOCK;
                for (int i = 0; i < Table::BLOCK; ++i) acc[tt] += v[i] * xr[i];
            }
        }
        for (int tt = 0; tt < HEAD_TOKENS && t0 + tt < tokens; ++tt) {
            const float s = warp_sum(acc[tt]);
            if (lane == 0) out[(long long)(t0 + tt) * vocab + col] = s;
        }
    }
}

// z → z / penalty where z > 0, else z · penalty, for the tokens marked in `seen` (the repetition penalty).
__global__ void penalize(float* __restrict__ logits, const unsigned char* __restrict__ seen, int vocab,
                         float penalty) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < vocab && seen[i]) logits[i] = logits[i] > 0.f ? logits[i] / penalty : logits[i] * penalty;
}

__global__ void mark_seen(unsigned char* __restrict__ seen, const int* __restrict__ token, int vocab) {
    if (threadIdx.x == 0 && token[0] >= 0 && token[0] < vocab) seen[token[0]] = 1;
}

#define SELECT_THREADS 256

// a comes before b: larger value first, the lower index among equals (numpy's argmax and stable sorts).
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

__device__ __forceinline__ float finite_or_lowest(float v) { return v == v ? v : NEG_INF; }

// Greedy selection: token[0] = the index of the largest logit (NaN counts as -inf). Each block reduces a
// grid-strided share; the last block to finish reduces the blocks' results.
__global__ void __launch_bounds__(SELECT_THREADS)
    argmax(const float* __restrict__ logits, int vocab, float* part_val, int* part_idx, int* counter,
           int* __restrict__ token) {
    __shared__ float sv[SELECT_THREADS];
    __shared__ int si[SELECT_THREADS];
    __shared__ int flag;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = blockIdx.x * SELECT_THREADS + threadIdx.x; i < vocab; i += gridDim.x * SELECT_THREADS) {
        const float v = finite_or_lowest(logits[i]);
        if (before(v, i, best, bi)) best = v, bi = i;
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    for (int s = SELECT_THREADS / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s && before(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
        }
    }
    if (threadIdx.x == 0) {
        part_val[blockIdx.x] = sv[0];
        part_idx[blockIdx.x] = si[0];
    }
    if (!last_block(counter, &flag)) return;
    best = NEG_INF;
    bi = 0x7fffffff;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += SELECT_THREADS) {
        const float v = __ldcg(part_val + b);
        const int i = __ldcg(part_idx + b);
        if (before(v, i, best, bi)) best = v, bi = i;
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    for (int s = SELECT_THREADS / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s && before(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
        }
    }
    if (threadIdx.x == 0) token[0] = si[0] < vocab ? si[0] : 0;
}

// Sorts SORT_SIZE (value, index) pairs in shared memory into `before` order (bitonic network).
#define SORT_SIZE 4096
#define TOPK 64

__device__ void bitonic_sort(float* sv, int* si) {
    for (int k = 2; k <= SORT_SIZE; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < SORT_SIZE; i += blockDim.x) {
                const int o = i ^ j;
                if (o > i) {
                    const bool first = (i & k) == 0;  // this pair belongs to a run sorted in `before` order
                    const bool swap = first ? before(sv[o], si[o], sv[i], si[i]) : before(sv[i], si[i], sv[o], si[o]);
                    if (swap) {
                        const float fv = sv[i];
                        sv[i] = sv[o];
                        sv[o] = fv;
                        const int fi = si[i];
                        si[i] = si[o];
                        si[o] = fi;
                    }
                }
            }
        }
    }
    __syncthreads();
}

// The TOPK largest logits in `before` order (NaN counts as -inf): block b sorts logits b·slice .. + slice - 1
// (slice <= SORT_SIZE) and keeps its TOPK best; the last block to finish sorts all blocks' candidates
// (gridDim.x·TOPK <= SORT_SIZE) and writes top_val / top_idx.
__global__ void __launch_bounds__(SELECT_THREADS)
    topk(const float* __restrict__ logits, int vocab, int slice, float* part_val, int* part_idx, int* counter,
         float* __restrict__ top_val, int* __restrict__ top_idx) {
    __shared__ float sv[SORT_SIZE];
    __shared__ int si[SORT_SIZE];
    __shared__ int flag;
    const int start = blockIdx.x * slice;
    for (int i = threadIdx.x; i < SORT_SIZE; i += SELECT_THREADS) {
        const bool real = i < slice && start + i < vocab;
        sv[i] = real ? finite_or_lowest(logits[start + i]) : NEG_INF;
        si[i] = real ? start + i : 0x7fffffff;
    }
    bitonic_sort(sv, si);
    for (int i = threadIdx.x; i < TOPK; i += SELECT_THREADS) {
        part_val[blockIdx.x * TOPK + i] = sv[i];
        part_idx[blockIdx.x * TOPK + i] = si[i];
    }
    if (!last_block(counter, &flag)) return;
    for (int i = threadIdx.x; i < SORT_SIZE; i += SELECT_THREADS) {
        const bool real = i < (int)gridDim.x * TOPK;
        sv[i] = real ? __ldcg(part_val + i) : NEG_INF;
        si[i] = real ? __ldcg(part_idx + i) : 0x7fffffff;
    }
    bitonic_sort(sv, si);
    for (int i = threadIdx.x; i < TOPK; i += SELECT_THREADS) {
        top_val[i] = sv[i];
        top_idx[i] = si[i];
    }
}
