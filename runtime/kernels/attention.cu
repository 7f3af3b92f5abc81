// Causal grouped-query attention over the KV cache. One block of ATT_THREADS threads per (token, head): query
// position pos[0] + t sees positions lo..qp (lo = qp - window + 1 when window > 0, else 0), taken in tiles of
// ATT_THREADS keys with an online softmax (running maximum and sum, float32). Scores are scaled, then soft-capped
// (softcap · tanh(score / softcap)) when softcap > 0. Dynamic shared memory: d floats (the query).
#define ATT_THREADS 128
#define ATT_MAX_DIM 256

__global__ void __launch_bounds__(ATT_THREADS)
    attention(const float* __restrict__ q, const float* __restrict__ cache_k, const float* __restrict__ cache_v,
              int layer, const int* __restrict__ pos, int heads, int kv_heads, int d, int n_ctx, int window,
              float scale, float softcap, float* __restrict__ out) {
    extern __shared__ float qs[];
    __shared__ float probs[ATT_THREADS];
    __shared__ float scratch[32];
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, kvh = h / (heads / kv_heads);
    const int qp = min(pos[0] + t, n_ctx - 1);
    const int lo = window > 0 ? max(0, qp - window + 1) : 0, n = qp + 1 - lo;
    const float* qrow = q + ((long long)t * heads + h) * d;
    for (int e = threadIdx.x; e < d; e += ATT_THREADS) qs[e] = qrow[e];
    __syncthreads();
    const float* keys = cache_k + (((long long)layer * kv_heads + kvh) * n_ctx + lo) * d;
    const float* values = cache_v + (((long long)layer * kv_heads + kvh) * n_ctx + lo) * d;
    float acc[ATT_MAX_DIM / ATT_THREADS];
    for (int i = 0; i < ATT_MAX_DIM / ATT_THREADS; ++i) acc[i] = 0.f;
    float run_max = NEG_INF, run_sum = 0.f;
    for (int j0 = 0; j0 < n; j0 += ATT_THREADS) {
        const int j = j0 + threadIdx.x;
        float s = NEG_INF;
        if (j < n) {
            float dot = 0.f;
            for (int e = 0; e < d; ++e) dot += qs[e] * keys[(long long)j * d + e];
            s = dot * scale;
            if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        }
        const float new_max = fmaxf(run_max, block_reduce<true>(s, scratch));
        const float corr = expf(run_max - new_max);
        const float p = j < n ? expf(s - new_max) : 0.f;
        __syncthreads();  // every thread is done reading the previous tile's probabilities
        probs[threadIdx.x] = p;
        run_sum = run_sum * corr + block_reduce<false>(p, scratch);  // its barriers publish probs
        run_max = new_max;
        const int count = min(ATT_THREADS, n - j0);
        for (int i = 0; i < ATT_MAX_DIM / ATT_THREADS; ++i) {
            const int e = threadIdx.x + i * ATT_THREADS;
            if (e < d) {
                float a = acc[i] * corr;
                for (int jj = 0; jj < count; ++jj) a += probs[jj] * values[(long long)(j0 + jj) * d + e];
                acc[i] = a;
            }
        }
    }
    float* orow = out + ((long long)t * heads + h) * d;
    for (int i = 0; i < ATT_MAX_DIM / ATT_THREADS; ++i) {
        const int e = threadIdx.x + i * ATT_THREADS;
        if (e < d) orow[e] = acc[i] / run_sum;
    }
}
