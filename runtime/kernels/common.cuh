// Helpers shared by every nanoquant kernel. The kernels include no CUDA headers (NVRTC compiles them without a
// toolkit's include folder): half and bfloat16 values travel as their bits and are converted with PTX instructions.
typedef unsigned int u32;
typedef unsigned short u16;

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// float32 of an IEEE half given as its bits (exact).
__device__ __forceinline__ float half_bits_to_float(u16 bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

// Two float32 rounded to bfloat16 (round to nearest even), `lo` in bits 0-15, `hi` in bits 16-31.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf16_lo(u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16_hi(u32 p) { return __uint_as_float(p & 0xffff0000u); }

// Digit `digit` (0, 1 or 2) of the exact three-term bfloat16 split of (lo, hi): v = d0 + d1 + d2 to float32
// precision, each d the bfloat16 rounding of what the earlier digits left. Every digit is computed, then one is
// kept, so all lanes of a warp run the same instructions.
__device__ __forceinline__ u32 bf16x3_digit(float lo, float hi, int digit) {
    u32 d0 = pack_bf16x2(lo, hi);
    float rl = lo - bf16_lo(d0), rh = hi - bf16_hi(d0);
    u32 d1 = pack_bf16x2(rl, rh);
    rl -= bf16_lo(d1);
    rh -= bf16_hi(d1);
    u32 d2 = pack_bf16x2(rl, rh);
    return digit == 0 ? d0 : (digit == 1 ? d1 : d2);
}

// Two signs as bfloat16 ±1: the bits at positions 15 - shift and 31 - shift of `word` (1 = -1).
__device__ __forceinline__ u32 signs_bf16x2(u32 word, int shift) {
    return ((word << shift) & 0x80008000u) | 0x3f803f80u;
}

// D = A·B + D on the tensor cores, m16n8k16, bfloat16 operands, float32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum (or max) over the block; `scratch` holds one float per warp. Every thread gets the result.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by an earlier reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < warps; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

// A grid whose blocks run in phases: each block draws a ticket in the order blocks start, so a block waiting
// for an earlier phase waits only on blocks that have already started (no deadlock however the hardware
// schedules blocks). counters: [0] tickets drawn, [1 + p] blocks of phase p finished.
__device__ __forceinline__ int draw_ticket(int* counters, int* shared_ticket) {
    if (threadIdx.x == 0) *shared_ticket = atomicAdd(&counters[0], 1);
    __syncthreads();
    return *shared_ticket;
}

__device__ __forceinline__ void wait_phase(int* counters, int phase, int blocks) {
    if (threadIdx.x == 0) {
        volatile int* done = counters + 1 + phase;
        while (*done < blocks) {
        }
        __threadfence();
    }
    __syncthreads();
}

// Marks this block's phase finished; the block that finishes the last phase last resets every counter (all
// blocks have drawn their tickets and passed their waits by then), so the next launch starts from zero.
__device__ __forceinline__ void finish_phase(int* counters, int phase, int phases, int phase_blocks) {
    __threadfence();  // every thread's writes of this phase are visible device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0) {
        int done = atomicAdd(&counters[1 + phase], 1);
        if (phase == phases - 1 && done == phase_blocks - 1) {
            for (int i = 0; i <= phases; ++i) counters[i] = 0;
        }
    }
}

// True in the block that finishes last (one counter, reset by that block): the threadfence reduction pattern.
__device__ __forceinline__ bool last_block(int* counter, int* shared_flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int done = atomicAdd(counter, 1);
        *shared_flag = done == (int)gridDim.x - 1;
        if (*shared_flag) *counter = 0;
    }
    __syncthreads();
    return *shared_flag != 0;
}
