// How one row of an embedding / output-head table is read, per storage type. A reader gives BLOCK (the
// elements one lane reads at once; the host picks a reader whose BLOCK divides the hidden size) and
// load(row, b, v): elements BLOCK·b .. BLOCK·b + BLOCK - 1 of the row (bytes) as float32. Adding a storage
// type is one reader here plus its entry in runtime/backends/cuda.py's TABLE_READERS.

struct F16x8 {  // IEEE half, 16-byte loads (rows 16-byte aligned: hidden % 8 == 0)
    static constexpr int BLOCK = 8;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        const uint4 q = *reinterpret_cast<const uint4*>(row + 16 * b);
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = half_bits_to_float((u16)(w[i] & 0xffffu));
            v[2 * i + 1] = half_bits_to_float((u16)(w[i] >> 16));
        }
    }
};

struct F16x1 {  // IEEE half, any hidden size
    static constexpr int BLOCK = 1;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        v[0] = half_bits_to_float(reinterpret_cast<const u16*>(row)[b]);
    }
};

struct F32x4 {  // float32, 16-byte loads (hidden % 4 == 0)
    static constexpr int BLOCK = 4;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        const float4 q = reinterpret_cast<const float4*>(row)[b];
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    }
};

struct F32x1 {  // float32, any hidden size
    static constexpr int BLOCK = 1;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        v[0] = reinterpret_cast<const float*>(row)[b];
    }
};

struct Q8_0 {  // GGML Q8_0: blocks of 34 bytes, a little-endian half scale then 32 int8 (2-byte aligned)
    static constexpr int BLOCK = 32;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        const u16* p = reinterpret_cast<const u16*>(row + 34 * b);
        const float scale = half_bits_to_float(p[0]);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const u16 pair = p[1 + i];
            v[2 * i] = scale * (float)(signed char)(pair & 0xff);
            v[2 * i + 1] = scale * (float)(signed char)(pair >> 8);
        }
    }
};

struct Q4_0 {  // GGML Q4_0: blocks of 18 bytes, a little-endian half scale then 16 bytes of nibbles: byte i holds
               // element i (low nibble) and element i + 16 (high nibble), value = (q - 8) * scale (2-byte aligned)
    static constexpr int BLOCK = 32;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        const u16* p = reinterpret_cast<const u16*>(row + 18 * b);
        const float scale = half_bits_to_float(p[0]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u16 pair = p[1 + i];
            v[2 * i] = scale * (float)((int)(pair & 0xf) - 8);
            v[2 * i + 16] = scale * (float)((int)((pair >> 4) & 0xf) - 8);
            v[2 * i + 1] = scale * (float)((int)((pair >> 8) & 0xf) - 8);
            v[2 * i + 17] = scale * (float)((int)(pair >> 12) - 8);
        }
    }
};

__constant__ float IQ4_NL_GRID[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                      1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

struct IQ4_NL {  // GGML IQ4_NL: Q4_0's layout, value = scale * IQ4_NL_GRID[q]
    static constexpr int BLOCK = 32;
    __device__ static void load(const unsigned char* row, int b, float* v) {
        const u16* p = reinterpret_cast<const u16*>(row + 18 * b);
        const float scale = half_bits_to_float(p[0]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u16 pair = p[1 + i];
            v[2 * i] = scale * IQ4_NL_GRID[pair & 0xf];
            v[2 * i + 16] = scale * IQ4_NL_GRID[(pair >> 4) & 0xf];
            v[2 * i + 1] = scale * IQ4_NL_GRID[(pair >> 8) & 0xf];
            v[2 * i + 17] = scale * IQ4_NL_GRID[pair >> 12];
        }
    }
};
