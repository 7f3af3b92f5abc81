// Causal grouped-query attention over the KV cache. One block of ATT_THREADS threads per (token, head): query
// position pos[0] + t sees positions lo..qp (lo = qp - window + 1 when window > 0, else 0), taken in tiles of
// ATT_THREADS keys with an online softmax (running maximum and sum, float32). Scores are scaled, then soft-capped
// (softcap · tanh(score / softcap)) when softcap > 0.
//
// In a tile, warp w takes keys w, w + ATT_WARPS, ...: the warp's 32 lanes read a key's row together (lane l holds
// dimensions l, l + 32, ...), so every load is coalesced, and the dot product is a warp sum. After the tile's
// maximum and sum (block reductions), each warp adds p_j·V_j over the same keys into its lanes' dimensions; the
// warps' partial outputs are summed at the end. Dynamic shared memory: ATT_WARPS·d floats.
#define ATT_THREADS 256
#define ATT_WARPS 8
#define ATT_MAX_DIM 256
#define ATT_LANE_DIMS 8

__global__ void __launch_bounds__(ATT_THREADS)
    attention(const float* __restrict__ q, const float* __restrict__ cache_k, const float* __restrict__ cache_v,
              int layer, const int* __restrict__ pos, int heads, int kv_heads, int d, int n_ctx, int window,
              float scale, float softcap, float* __restrict__ out) {
    static_assert(ATT_THREADS == 32 * ATT_WARPS && ATT_MAX_DIM == 32 * ATT_LANE_DIMS, "attention layout");
    extern __shared__ float part[];  // [ATT_WARPS][d]: each warp's share of the output
    __shared__ float probs[ATT_THREADS];
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, kvh = h / (heads / kv_heads);
    const int qp = min(pos[0] + t, n_ctx - 1);
    const int lo = window > 0 ? max(0, qp - window + 1) : 0, n = qp + 1 - lo;
    const float* qrow = q + ((long long)t * heads + h) * d;
    const float* keys = cache_k + (((long long)layer * kv_heads + kvh) * n_ctx + lo) * d;
    const float* values = cache_v + (((long long)layer * kv_heads + kvh) * n_ctx + lo) * d;
    float qv[ATT_LANE_DIMS], acc[ATT_LANE_DIMS];
#pragma unroll
    for (int i = 0; i < ATT_LANE_DIMS; ++i) {
        const int e = lane + 32 * i;
        qv[i] = e < d ? qrow[e] : 0.f;
        acc[i] = 0.f;
    }
    float run_max = NEG_INF, run_sum = 0.f;
    for (int j0 = 0; j0 < n; j0 += ATT_THREADS) {
        const int count = min(ATT_THREADS, n - j0);
#pragma unroll 8
        for (int jj = warp; jj < count; jj += ATT_WARPS) {
            const float* krow = keys + (long long)(j0 + jj) * d;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_LANE_DIMS; ++i) {
                const int e = lane + 32 * i;
                if (e < d) dot += qv[i] * krow[e];
            }
            float s = warp_sum(dot) * scale;
            if (softcap > 0.f) s = softcap * tanhf(s / softcap);
            if (lane == 0) probs[jj] = s;
        }
        __syncthreads();
        const float s = threadIdx.x < count ? probs[threadIdx.x] : NEG_INF;
        const float new_max = fmaxf(run_max, block_reduce<true>(s, scratch));
        const float corr = expf(run_max - new_max);
        const float p = threadIdx.x < count ? expf(s - new_max) : 0.f;
        probs[threadIdx.x] = p;  // each thread rewrites only the score it read
        run_sum = run_sum * corr + block_reduce<false>(p, scratch);  // its barriers publish probs
        run_max = new_max;
#pragma unroll
        for (int i = 0; i < ATT_LANE_DIMS; ++i) acc[i] *= corr;
#pragma unroll 8
        for (int jj = warp; jj < count; jj += ATT_WARPS) {
            const float pj = probs[jj];
            const float* vrow = values + (long long)(j0 + jj) * d;
#pragma unroll
            for (int i = 0; i < ATT_LANE_DIMS; ++i) {
                const int e = lane + 32 * i;
                if (e < d) acc[i] += pj * vrow[e];
            }
        }
        __syncthreads();  // every warp is done reading probs before the next tile's scores
    }
#pragma unroll
    for (int i = 0; i < ATT_LANE_DIMS; ++i) {
        const int e = lane + 32 * i;
        if (e < d) part[warp * d + e] = acc[i];
    }
    __syncthreads();
    float* orow = out + ((long long)t * heads + h) * d;
    for (int e = threadIdx.x; e < d; e += ATT_THREADS) {
        float v = 0.f;
        for (int w = 0; w < ATT_WARPS; ++w) v += part[w * d + e];
        orow[e] = v / run_sum;
    }
}
