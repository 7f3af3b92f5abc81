// Binary factored linears on the tensor cores: y = Σ_paths s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) (+ bias).
//
// Signs live on the device in "fragment order": a sign matrix is cut into tiles of 16 rows and chunks of 64
// columns; each (tile, chunk) is 32 words, word `lane` holding exactly the 32 signs that lane feeds the
// m16n8k16 mma. With lane = 4g + t and i = 0..15 decoded as w = i>>3, rsel = (i>>2)&1, sidx = i&3,
// s = 8(sidx>>1) + 2t + (sidx&1): bits 15-i and 31-i are the signs of row 16·tile + g + 8·rsel at columns
// c = 64·chunk + 32w + 15 - s and c + 16. Shifting the word left by i puts that pair at bits 15 and 31, so two
// signs become a bfloat16x2 ±1 operand in two integer instructions (signs_bf16x2). The order of the reduction
// dimension inside an mma is free as long as both operands agree, which the input digits below do.
//
// Inputs enter as three bfloat16 digits (bf16x3_digit): v = d0 + d1 + d2 to float32 precision, so ±1 × digit
// products are exact and the tensor cores accumulate in float32. "Digit words" hold, per 64-column chunk,
// 96 words: lane (g, t) of a warp, g < 3, reads its 8 words at (4g + t)·8; word j = 2(2w + hh) + b carries
// digit g of the columns 64·chunk + 32w + 15 - s and + 16, s = 8hh + 2t + b, i.e. operand b0 (b = 0) and b1
// (b = 1) of mma step (w, hh). Lanes g >= 3 feed zeros, so C's columns 0-2 are the three digits' partial sums.
//
// Padding: rows past the matrix and columns past its width are +1 signs (bit 0) against zero digits; scales of
// padding rows are zero, so nothing outside the real matrix reaches an output.

#define TILE_ROWS 16
#define CHUNK_COLS 64
#define BLOCK_TILES 4
#define DIGIT_WORDS 96
#define MAX_KSPLIT 8
#define GEMM_TOKENS 32
#define PREFETCH 8

// Signs of one path (rows × cols, the file's layout: ceil(cols/32) little-endian words per row, bit 1 = -1)
// into fragment order: tiles × chunks lane words written at dst[(tile·dst_chunks + chunk_offset + chunk)·32].
__global__ void repack_signs(const u32* __restrict__ src, int rows, int cols, int src_words, u32* __restrict__ dst,
                             int tiles, int chunks, int dst_chunks, int chunk_offset) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)tiles * chunks * 32) return;
    const int lane = (int)(idx & 31), g = lane >> 2, t = lane & 3;
    const int chunk = (int)((idx >> 5) % chunks), tile = (int)((idx >> 5) / chunks);
    u32 out = 0;
    for (int i = 0; i < 16; ++i) {
        const int w = i >> 3, rsel = (i >> 2) & 1, sidx = i & 3;
        const int s = 8 * (sidx >> 1) + 2 * t + (sidx & 1);
        const int row = tile * TILE_ROWS + g + 8 * rsel;
        const int col = chunk * CHUNK_COLS + 32 * w + 15 - s;
        if (row < rows && col < cols) {
            const u32 word = src[(long long)row * src_words + (col >> 5)];  // col and col + 16 share this word
            out |= ((word >> (col & 31)) & 1u) << (15 - i);
            if (col + 16 < cols) out |= ((word >> ((col & 31) + 16)) & 1u) << (31 - i);
        }
    }
    dst[((long long)tile * dst_chunks + chunk_offset + chunk) * 32 + lane] = out;
}

// The four mmas of one 64-column chunk: lane word `lw` against the lane's 8 digit words.
__device__ __forceinline__ void chunk_mma(u32 lw, const u32* digits, bool has_digits, float (&acc)[4]) {
    uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = make_uint4(0u, 0u, 0u, 0u);
    if (has_digits) {
        lo = __ldcg(reinterpret_cast<const uint4*>(digits));
        hi = __ldcg(reinterpret_cast<const uint4*>(digits) + 1);
    }
    const u32 b[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int w = 0; w < 2; ++w) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = 8 * w + 2 * hh;  // register index of row g; row g + 8 is r + 4
            mma_bf16(acc, signs_bf16x2(lw, r), signs_bf16x2(lw, r + 4), signs_bf16x2(lw, r + 1),
                     signs_bf16x2(lw, r + 5), b[2 * (2 * w + hh)], b[2 * (2 * w + hh) + 1]);
        }
    }
}

// Digit word j (0..95) of a chunk whose 64 values come from value(col), col in 0..63.
__device__ __forceinline__ void digit_word_cols(int j, int& digit, int& col) {
    const int lane = j >> 3, jj = j & 7;
    const int t = lane & 3, w = jj >> 2, hh = (jj >> 1) & 1, b = jj & 1;
    digit = lane >> 2;
    col = 32 * w + 15 - (8 * hh + 2 * t + b);
}

// Sum of C's digit columns for rows g and g + 8 of the warp's tile, in every lane of the group.
__device__ __forceinline__ void tile_row_sums(const float (&acc)[4], float& r0, float& r1) {
    r0 = acc[0] + acc[1];
    r1 = acc[2] + acc[3];
    r0 += __shfl_xor_sync(FULL_MASK, r0, 1);
    r1 += __shfl_xor_sync(FULL_MASK, r1, 1);
    r0 += __shfl_xor_sync(FULL_MASK, r0, 2);
    r1 += __shfl_xor_sync(FULL_MASK, r1, 2);
}

// A warp's first PREFETCH lane words of chunks c0..c1-1 (zero past c1). The weights do not depend on the
// input, so a block loads them before it waits for the phase that produces its input: their memory latency
// overlaps the wait instead of following it.
__device__ __forceinline__ void prefetch_words(const u32* arow, int c0, int c1, u32 (&words)[PREFETCH]) {
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) words[i] = c0 + i < c1 ? __ldg(arow + (c0 + i) * 32) : 0u;
}

// End of one path's chunks in stage 2: its sums for rows row0 and row1, times s_out of that path, join the totals.
__device__ __forceinline__ void path_end(float (&acc)[4], const float* s_out_p, int m, int row0, int row1,
                                         float& tot0, float& tot1) {
    float r0, r1;
    tile_row_sums(acc, r0, r1);
    if (row0 < m) tot0 += s_out_p[row0] * r0;
    if (row1 < m) tot1 += s_out_p[row1] * r1;
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
}

// One token through a whole factored linear in one launch of three phases (tickets, see common.cuh):
//  0. digits of s_in_p ⊙ x for every path (blocks0 blocks, one digit word per thread) into xb;
//  1. one block per 64 stacked stage-1 rows (each path's r_p rows padded to a multiple of 64; blocks1 in all):
//     h = s_mid ⊙ V·(s_in ⊙ x), written straight as the digit words of that chunk of stage 2's input (hb);
//  2. one block per 64 output rows: y = Σ_p s_out_p ⊙ U_p·h_p (+ bias).
// Blocks are 4·ksplit warps: warp w multiplies tile w % 4 of the block over the w / 4-th part of the chunks;
// the parts are summed in shared memory. seg[p] is the first stage-1 block (= stage-2 chunk) of path p,
// seg[paths] = blocks1 = k2_chunks. counters: 4 ints, zero before the first launch, left zero after each.
__global__ void __launch_bounds__(128 * MAX_KSPLIT, 1)
    binary_gemv(const float* __restrict__ x, int n, const float* __restrict__ s_in, int k1_chunks,
                const u32* __restrict__ a1, const float* __restrict__ s_mid, const u32* __restrict__ a2,
                int k2_chunks, const int* __restrict__ seg, const float* __restrict__ s_out,
                const float* __restrict__ bias, int has_bias, float* __restrict__ y, int m, int paths, u32* xb,
                u32* hb, int* counters, int blocks0, int blocks1) {
    __shared__ int ticket_s;
    __shared__ float part[MAX_KSPLIT][BLOCK_TILES * TILE_ROWS];
    __shared__ float hrow[BLOCK_TILES * TILE_ROWS];
    const int ticket = draw_ticket(counters, &ticket_s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int ksplit = blockDim.x >> 7, tl = warp & 3, kpart = warp >> 2;
    const int blocks2 = gridDim.x - blocks0 - blocks1;

    if (ticket < blocks0) {
        const long long idx = ticket * (long long)blockDim.x + threadIdx.x;
        if (idx < (long long)paths * k1_chunks * DIGIT_WORDS) {
            const int j = (int)(idx % DIGIT_WORDS);
            const int chunk = (int)((idx / DIGIT_WORDS) % k1_chunks), p = (int)(idx / DIGIT_WORDS / k1_chunks);
            int digit, col;
            digit_word_cols(j, digit, col);
            col += chunk * CHUNK_COLS;
            const float* sp = s_in + (long long)p * n;
            const float lo = col < n ? sp[col] * x[col] : 0.f;
            const float hi = col + 16 < n ? sp[col + 16] * x[col + 16] : 0.f;
            xb[idx] = bf16x3_digit(lo, hi, digit);
        }
        finish_phase(counters, 0, 3, blocks0);
        return;
    }

    if (ticket < blocks0 + blocks1) {
        const int rb = ticket - blocks0;
        int p = 0;
        while (p + 1 < paths && seg[p + 1] <= rb) ++p;
        const int c0 = kpart * k1_chunks / ksplit, c1 = (kpart + 1) * k1_chunks / ksplit;
        const u32* arow = a1 + (long long)(rb * BLOCK_TILES + tl) * k1_chunks * 32 + lane;
        u32 words[PREFETCH];
        prefetch_words(arow, c0, c1, words);
        wait_phase(counters, 0, blocks0);
        const u32* digits = xb + (long long)p * k1_chunks * DIGIT_WORDS + (4 * g + t) * 8;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < PREFETCH; ++i) {
            if (c0 + i < c1) chunk_mma(words[i], digits + (c0 + i) * DIGIT_WORDS, g < 3, acc);
        }
        for (int c = c0 + PREFETCH; c < c1; ++c) chunk_mma(arow[c * 32], digits + c * DIGIT_WORDS, g < 3, acc);
        float r0, r1;
        tile_row_sums(acc, r0, r1);
        if (t == 0) {
            part[kpart][tl * TILE_ROWS + g] = r0;
            part[kpart][tl * TILE_ROWS + g + 8] = r1;
        }
        __syncthreads();
        if (threadIdx.x < BLOCK_TILES * TILE_ROWS) {
            float v = 0.f;
            for (int k = 0; k < ksplit; ++k) v += part[k][threadIdx.x];
            hrow[threadIdx.x] = v * s_mid[rb * CHUNK_COLS + threadIdx.x];
        }
        __syncthreads();
        if (threadIdx.x < DIGIT_WORDS) {
            int digit, col;
            digit_word_cols(threadIdx.x, digit, col);
            hb[rb * DIGIT_WORDS + threadIdx.x] = bf16x3_digit(hrow[col], hrow[col + 16], digit);
        }
        finish_phase(counters, 1, 3, blocks1);
        return;
    }

    const int ob = ticket - blocks0 - blocks1;
    const int c0 = kpart * k2_chunks / ksplit, c1 = (kpart + 1) * k2_chunks / ksplit;
    const u32* arow = a2 + (long long)(ob * BLOCK_TILES + tl) * k2_chunks * 32 + lane;
    u32 words[PREFETCH];
    prefetch_words(arow, c0, c1, words);
    wait_phase(counters, 1, blocks1);
    const int row0 = (ob * BLOCK_TILES + tl) * TILE_ROWS + g, row1 = row0 + 8;
    const u32* digits = hb + (4 * g + t) * 8;
    int p = 0;
    while (p + 1 < paths && seg[p + 1] <= c0) ++p;
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, tot0 = 0.f, tot1 = 0.f;
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
        if (c0 + i < c1) {
            if (c0 + i == seg[p + 1]) path_end(acc, s_out + (long long)p++ * m, m, row0, row1, tot0, tot1);
            chunk_mma(words[i], digits + (c0 + i) * DIGIT_WORDS, g < 3, acc);
        }
    }
    for (int c = c0 + PREFETCH; c < c1; ++c) {
        if (c == seg[p + 1]) path_end(acc, s_out + (long long)p++ * m, m, row0, row1, tot0, tot1);
        chunk_mma(arow[c * 32], digits + c * DIGIT_WORDS, g < 3, acc);
    }
    path_end(acc, s_out + (long long)p * m, m, row0, row1, tot0, tot1);
    if (t == 0) {
        part[kpart][tl * TILE_ROWS + g] = tot0;
        part[kpart][tl * TILE_ROWS + g + 8] = tot1;
    }
    __syncthreads();
    if (threadIdx.x < BLOCK_TILES * TILE_ROWS) {
        const int row = ob * BLOCK_TILES * TILE_ROWS + threadIdx.x;
        if (row < m) {
            float v = 0.f;
            for (int k = 0; k < ksplit; ++k) v += part[k][threadIdx.x];
            y[row] = has_bias ? v + bias[row] : v;
        }
    }
    finish_phase(counters, 2, 3, blocks2);
}

// Several tokens through one stage of one path (prefill): Y[t, i] = s_out[i]·Σ_k A[i, k]·s_in[k]·X[t, k]
// (s_in = 1 when has_s_in is 0), plus Y's old value when `accumulate`, plus bias[i] when `has_bias`.
// A: fragment order, chunk c of tile i at a[(tile·a_chunks + chunk_offset + c)·32]. Block: 4 warps, one
// tile each (64 rows), × 32 tokens (blockIdx.y); per chunk the block writes the 32 tokens' digit operands to
// shared memory once and each warp reuses them for its tile: 4 steps × 4 token groups × 3 digits of mma.
__global__ void __launch_bounds__(128)
    binary_gemm(const float* __restrict__ X, int ldx, int tokens, int k_cols, const float* __restrict__ s_in,
                int has_s_in, const u32* __restrict__ a, int chunks, int a_chunks, int chunk_offset,
                const float* __restrict__ s_out, const float* __restrict__ bias, int has_bias, float* __restrict__ Y,
                int ldy, int rows, int accumulate) {
    static_assert(GEMM_TOKENS == 4 * 8, "the loops below run four token groups of 8");
    __shared__ uint2 sb[4 * 4 * 3 * 32];  // [step][token group][digit][lane] -> (b0, b1)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x * BLOCK_TILES + warp, tok0 = blockIdx.y * GEMM_TOKENS;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    u32* sbw = reinterpret_cast<u32*>(sb);
    for (int c = 0; c < chunks; ++c) {
        __syncthreads();  // the previous chunk's operands are no longer read
        for (int idx = threadIdx.x; idx < 4 * 4 * 3 * 32 * 2; idx += blockDim.x) {
            const int b = idx & 1, l = (idx >> 1) & 31, rest = idx >> 6;
            const int digit = rest % 3, group = (rest / 3) & 3, step = rest / 12;
            const int w = step >> 1, hh = step & 1, lg = l >> 2, lt = l & 3;
            const int col = c * CHUNK_COLS + 32 * w + 15 - (8 * hh + 2 * lt + b);
            const int tok = tok0 + group * 8 + lg;
            float lo = 0.f, hi = 0.f;
            if (tok < tokens) {
                const float* xr = X + (long long)tok * ldx;
                if (col < k_cols) lo = has_s_in ? xr[col] * s_in[col] : xr[col];
                if (col + 16 < k_cols) hi = has_s_in ? xr[col + 16] * s_in[col + 16] : xr[col + 16];
            }
            sbw[idx] = bf16x3_digit(lo, hi, digit);
        }
        __syncthreads();
        const u32 lw = a[((long long)tile * a_chunks + chunk_offset + c) * 32 + lane];
#pragma unroll
        for (int step = 0; step < 4; ++step) {
            const int r = 8 * (step >> 1) + 2 * (step & 1);
            const u32 a0 = signs_bf16x2(lw, r), a1 = signs_bf16x2(lw, r + 4);
            const u32 a2 = signs_bf16x2(lw, r + 1), a3 = signs_bf16x2(lw, r + 5);
#pragma unroll
            for (int group = 0; group < 4; ++group) {
#pragma unroll
                for (int digit = 0; digit < 3; ++digit) {
                    const uint2 bv = sb[((step * 4 + group) * 3 + digit) * 32 + lane];
                    mma_bf16(acc[group], a0, a1, a2, a3, bv.x, bv.y);
                }
            }
        }
    }
#pragma unroll
    for (int group = 0; group < 4; ++group) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = tile * TILE_ROWS + g + 8 * (e >> 1), tok = tok0 + group * 8 + 2 * t + (e & 1);
            if (row < rows && tok < tokens) {
                float v = s_out[row] * acc[group][e];
                float* out = Y + (long long)tok * ldy + row;
                if (accumulate) v += *out;
                if (has_bias) v += bias[row];
                *out = v;
            }
        }
    }
}
