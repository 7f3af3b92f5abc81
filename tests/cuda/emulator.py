"""A numpy transliteration of every kernel in runtime/kernels, and a device that runs them, so the cuda backend
runs on a CPU. Each function keeps its kernel's grid, block, warp and chunk loops and index arithmetic; the lanes
of a warp (or the threads of a block) are numpy vectors, warp shuffles index those vectors, shared memory is a
numpy array, and the m16n8k16 mma is built from the PTX ISA's fragment layouts. Blocks of a phased kernel run in
ticket order, and a wait that would not already be satisfied fails (on the GPU it would hang).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from runtime import kernels

C = kernels.constants()
U32, F32 = np.uint32, np.float32
LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3


def flat(a: np.ndarray) -> np.ndarray:
    """A pointer's view: the array's memory as one dimension (writes go through)."""
    out = a.reshape(-1)
    assert np.shares_memory(out, a), "kernel arguments must be contiguous"
    return out


# --- common.cuh ---------------------------------------------------------------------------------------------------
def f16_to_f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def bf16_round(v) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (cvt.rn.bf16 for finite values)."""
    b = np.asarray(v, dtype=F32).view(U32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF).astype(U32)


def pack_bf16x2(lo, hi) -> np.ndarray:
    return (bf16_round(hi) << U32(16)) | bf16_round(lo)


def bf16_lo(p) -> np.ndarray:
    return (np.asarray(p, dtype=U32) << U32(16)).view(F32)


def bf16_hi(p) -> np.ndarray:
    return (np.asarray(p, dtype=U32) & U32(0xFFFF0000)).view(F32)


def bf16x3_digit(lo, hi, digit) -> np.ndarray:
    lo, hi = np.asarray(lo, F32), np.asarray(hi, F32)
    d0 = pack_bf16x2(lo, hi)
    rl, rh = lo - bf16_lo(d0), hi - bf16_hi(d0)
    d1 = pack_bf16x2(rl, rh)
    rl, rh = rl - bf16_lo(d1), rh - bf16_hi(d1)
    d2 = pack_bf16x2(rl, rh)
    return np.where(digit == 0, d0, np.where(digit == 1, d1, d2)).astype(U32)


def signs_bf16x2(word, shift: int) -> np.ndarray:
    return ((np.asarray(word, U32) << U32(shift)) & U32(0x80008000)) | U32(0x3F803F80)


def mma_bf16(acc: np.ndarray, a0, a1, a2, a3, b0, b1) -> None:
    """acc (..., 32 lanes, 4) += A·B for one m16n8k16 mma, operands given per lane as in PTX: A row g holds a0
    (cols 2t, 2t+1) and a2 (cols 2t+8, 2t+9), row g+8 a1 and a3; B col g holds b0 (rows 2t, 2t+1) and b1 (rows
    2t+8, 2t+9); C (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) are acc[..., :, 0..3]. Products are exact; the sum
    is formed in float64 and rounded once (the tensor cores accumulate in float32)."""
    batch = np.broadcast(np.asarray(b0), np.asarray(acc[..., 0])).shape[:-1]
    a = np.zeros((16, 16))
    for reg, row_off, col_off in ((a0, 0, 0), (a1, 8, 0), (a2, 0, 8), (a3, 8, 8)):
        a[G + row_off, 2 * T + col_off] = bf16_lo(reg)
        a[G + row_off, 2 * T + col_off + 1] = bf16_hi(reg)
    b = np.zeros(batch + (16, 8))
    for reg, row_off in ((b0, 0), (b1, 8)):
        reg = np.broadcast_to(np.asarray(reg, U32), batch + (32,))
        b[..., 2 * T + row_off, G] = bf16_lo(reg)
        b[..., 2 * T + row_off + 1, G] = bf16_hi(reg)
    c = np.zeros(batch + (16, 8))
    for e in range(4):
        c[..., G + 8 * (e >> 1), 2 * T + (e & 1)] = acc[..., e]
    d = a @ b + c
    for e in range(4):
        acc[..., e] = d[..., G + 8 * (e >> 1), 2 * T + (e & 1)]


def shfl_xor(v: np.ndarray, mask: int) -> np.ndarray:
    return v[..., LANES ^ mask]


class Tickets:
    """draw_ticket / wait_phase / finish_phase of common.cuh on a counters array, blocks run in ticket order."""

    def __init__(self, counters: np.ndarray) -> None:
        self.c = flat(counters)

    def draw(self) -> int:
        ticket = int(self.c[0])
        self.c[0] += 1
        return ticket

    def wait(self, phase: int, blocks: int) -> None:
        assert self.c[1 + phase] >= blocks, "a block waits on a phase that has not finished: the GPU would hang"

    def finish(self, phase: int, phases: int, phase_blocks: int) -> None:
        done = int(self.c[1 + phase])
        self.c[1 + phase] += 1
        if phase == phases - 1 and done == phase_blocks - 1:
            self.c[:phases + 1] = 0


def last_block(counter: np.ndarray, grid: int) -> bool:
    c = flat(counter)
    done = int(c[0])
    c[0] += 1
    if done == grid - 1:
        c[0] = 0
        return True
    return False


# --- binary.cu ----------------------------------------------------------------------------------------------------
TILE, CHUNK, BT, DW, MAXK = C["TILE_ROWS"], C["CHUNK_COLS"], C["BLOCK_TILES"], C["DIGIT_WORDS"], C["MAX_KSPLIT"]


def repack_signs(grid, block, shared, src, rows, cols, src_words, dst, tiles, chunks, dst_chunks, chunk_offset):
    src, dst = flat(src), flat(dst)
    threads = grid[0] * block[0]
    idx = np.arange(threads, dtype=np.int64)
    idx = idx[idx < tiles * chunks * 32]
    lane = idx & 31
    g, t = lane >> 2, lane & 3
    chunk, tile = (idx >> 5) % chunks, (idx >> 5) // chunks
    out = np.zeros(len(idx), U32)
    for i in range(16):
        w, rsel, sidx = i >> 3, (i >> 2) & 1, i & 3
        s = 8 * (sidx >> 1) + 2 * t + (sidx & 1)
        row = tile * TILE + g + 8 * rsel
        col = chunk * CHUNK + 32 * w + 15 - s
        lo = (row < rows) & (col < cols)
        word = np.zeros(len(idx), U32)
        word[lo] = src[row[lo] * src_words + (col[lo] >> 5)]
        hi = lo & (col + 16 < cols)
        out |= np.where(lo, ((word >> (col & 31).astype(U32)) & U32(1)) << U32(15 - i), U32(0))
        out |= np.where(hi, ((word >> ((col & 31) + 16).astype(U32)) & U32(1)) << U32(31 - i), U32(0))
    dst[(tile * dst_chunks + chunk_offset + chunk) * 32 + lane] = out


def chunk_mma(lw: np.ndarray, digits: Callable[[int], np.ndarray], acc: np.ndarray) -> None:
    """The four mmas of a chunk; digits(j) is each lane's digit word j (zero where g >= 3)."""
    b = [digits(j) for j in range(8)]
    for w in range(2):
        for hh in range(2):
            r = 8 * w + 2 * hh
            mma_bf16(acc, signs_bf16x2(lw, r), signs_bf16x2(lw, r + 4), signs_bf16x2(lw, r + 1),
                     signs_bf16x2(lw, r + 5), b[2 * (2 * w + hh)], b[2 * (2 * w + hh) + 1])


def digit_word_cols(j):
    lane, jj = j >> 3, j & 7
    t, w, hh, b = lane & 3, jj >> 2, (jj >> 1) & 1, jj & 1
    return lane >> 2, 32 * w + 15 - (8 * hh + 2 * t + b)


def tile_row_sums(acc):
    r0, r1 = acc[:, 0] + acc[:, 1], acc[:, 2] + acc[:, 3]
    r0, r1 = r0 + shfl_xor(r0, 1), r1 + shfl_xor(r1, 1)
    return r0 + shfl_xor(r0, 2), r1 + shfl_xor(r1, 2)


def lane_digits(buf: np.ndarray, base: int) -> Callable[[int], np.ndarray]:
    """Lane (g, t) reads words base + (4g + t)·8 + j when g < 3 (the two uint4 loads), zeros otherwise."""
    def load(j: int) -> np.ndarray:
        out = np.zeros(32, U32)
        has = G < 3
        out[has] = buf[base + (4 * G[has] + T[has]) * 8 + j]
        return out
    return load


def binary_gemv(grid, block, shared, x, n, s_in, k1_chunks, a1, s_mid, a2, k2_chunks, seg, s_out, bias, has_bias, y,
                m, paths, xb, hb, counters, blocks0, blocks1):
    x, s_in, a1, s_mid, a2, seg, s_out, bias, y, xb, hb = map(flat, (x, s_in, a1, s_mid, a2, seg, s_out, bias, y,
                                                                     xb, hb))
    blockdim, gridx = block[0], grid[0]
    assert blockdim % 128 == 0 and blockdim // 128 <= MAXK
    ksplit = blockdim >> 7
    blocks2 = gridx - blocks0 - blocks1
    tickets = Tickets(counters)
    for _ in range(gridx):
        ticket = tickets.draw()
        part = np.full((MAXK, BT * TILE), np.nan, F32)
        if ticket < blocks0:
            idx = ticket * blockdim + np.arange(blockdim, dtype=np.int64)
            idx = idx[idx < paths * k1_chunks * DW]
            j = idx % DW
            chunk, p = (idx // DW) % k1_chunks, idx // DW // k1_chunks
            digit, col = digit_word_cols(j)
            col = col + chunk * CHUNK
            lo = np.where(col < n, s_in[p * n + np.minimum(col, n - 1)] * x[np.minimum(col, n - 1)], F32(0))
            hi = np.where(col + 16 < n, s_in[p * n + np.minimum(col + 16, n - 1)] * x[np.minimum(col + 16, n - 1)],
                          F32(0))
            xb[idx] = bf16x3_digit(lo, hi, digit)
            tickets.finish(0, 3, blocks0)
            continue
        if ticket < blocks0 + blocks1:
            rb = ticket - blocks0
            p = 0
            while p + 1 < paths and seg[p + 1] <= rb:
                p += 1
            tickets.wait(0, blocks0)
            for warp in range(blockdim // 32):
                tl, kpart = warp & 3, warp >> 2
                c0, c1 = kpart * k1_chunks // ksplit, (kpart + 1) * k1_chunks // ksplit
                arow = (rb * BT + tl) * k1_chunks * 32 + LANES
                acc = np.zeros((32, 4), F32)
                for c in range(c0, c1):
                    chunk_mma(a1[arow + c * 32], lane_digits(xb, (p * k1_chunks + c) * DW), acc)
                r0, r1 = tile_row_sums(acc)
                lead = T == 0
                part[kpart, tl * TILE + G[lead]] = r0[lead]
                part[kpart, tl * TILE + G[lead] + 8] = r1[lead]
            th = np.arange(BT * TILE)
            hrow = part[:ksplit, th].sum(axis=0, dtype=F32) * s_mid[rb * CHUNK + th]
            th = np.arange(DW)
            digit, col = digit_word_cols(th)
            hb[rb * DW + th] = bf16x3_digit(hrow[col], hrow[col + 16], digit)
            tickets.finish(1, 3, blocks1)
            continue
        ob = ticket - blocks0 - blocks1
        tickets.wait(1, blocks1)
        for warp in range(blockdim // 32):
            tl, kpart = warp & 3, warp >> 2
            c0, c1 = kpart * k2_chunks // ksplit, (kpart + 1) * k2_chunks // ksplit
            row0 = (ob * BT + tl) * TILE + G
            row1 = row0 + 8
            arow = (ob * BT + tl) * k2_chunks * 32 + LANES
            p = 0
            while p + 1 < paths and seg[p + 1] <= c0:
                p += 1
            acc = np.zeros((32, 4), F32)
            tot0, tot1 = np.zeros(32, F32), np.zeros(32, F32)
            c = c0
            while c <= c1:
                if c == c1 or c == seg[p + 1]:
                    r0, r1 = tile_row_sums(acc)
                    tot0 += np.where(row0 < m, s_out[p * m + np.minimum(row0, m - 1)] * r0, F32(0))
                    tot1 += np.where(row1 < m, s_out[p * m + np.minimum(row1, m - 1)] * r1, F32(0))
                    acc[:] = 0
                    if c == c1:
                        break
                    p += 1
                chunk_mma(a2[arow + c * 32], lane_digits(hb, c * DW), acc)
                c += 1
            lead = T == 0
            part[kpart, tl * TILE + G[lead]] = tot0[lead]
            part[kpart, tl * TILE + G[lead] + 8] = tot1[lead]
        th = np.arange(BT * TILE)
        row = ob * BT * TILE + th
        ok = row < m
        v = part[:ksplit, th].sum(axis=0, dtype=F32)
        y[row[ok]] = v[ok] + bias[row[ok]] if has_bias else v[ok]
        tickets.finish(2, 3, blocks2)


def binary_gemm(grid, block, shared, X, ldx, tokens, k_cols, s_in, has_s_in, a, chunks, a_chunks, chunk_offset, s_out,
                bias, has_bias, Y, ldy, rows, accumulate):
    X, s_in, a, s_out, bias, Y = map(flat, (X, s_in, a, s_out, bias, Y))
    assert block[0] == 128
    for bx in range(grid[0]):
        for by in range(grid[1]):
            tok0 = by * C["GEMM_TOKENS"]
            acc = np.zeros((4, 4, 32, 4), F32)  # [warp][group][lane][e]
            for c in range(chunks):
                idx = np.arange(4 * 4 * 3 * 32 * 2)
                b, l, rest = idx & 1, (idx >> 1) & 31, idx >> 6
                digit, group, step = rest % 3, (rest // 3) & 3, rest // 12
                w, hh, lg, lt = step >> 1, step & 1, l >> 2, l & 3
                col = c * CHUNK + 32 * w + 15 - (8 * hh + 2 * lt + b)
                tok = tok0 + group * 8 + lg
                ok = tok < tokens
                safe_tok = np.minimum(tok, tokens - 1)

                def value(cc):
                    inside = ok & (cc < k_cols)
                    cs = np.minimum(cc, k_cols - 1)
                    v = X[safe_tok * ldx + cs] * (s_in[cs] if has_s_in else F32(1))
                    return np.where(inside, v, F32(0)).astype(F32)

                sbw = bf16x3_digit(value(col), value(col + 16), digit)
                sb = sbw.reshape(4, 4, 3, 32, 2)
                for warp in range(4):
                    tile = bx * BT + warp
                    lw = a[(tile * a_chunks + chunk_offset + c) * 32 + LANES]
                    for step_ in range(4):
                        r = 8 * (step_ >> 1) + 2 * (step_ & 1)
                        a0, a1_ = signs_bf16x2(lw, r), signs_bf16x2(lw, r + 4)
                        a2_, a3 = signs_bf16x2(lw, r + 1), signs_bf16x2(lw, r + 5)
                        for digit_ in range(3):  # the four token groups' mmas at once (independent accumulators)
                            mma_bf16(acc[warp], a0, a1_, a2_, a3, sb[step_, :, digit_, :, 0], sb[step_, :, digit_, :, 1])
            for warp in range(4):
                tile = bx * BT + warp
                for group in range(4):
                    for e in range(4):
                        row = tile * TILE + G + 8 * (e >> 1)
                        tok = tok0 + group * 8 + 2 * T + (e & 1)
                        ok = (row < rows) & (tok < tokens)
                        r, tk = row[ok], tok[ok]
                        v = s_out[r] * acc[warp, group, ok, e]
                        out = tk * ldy + r
                        if accumulate:
                            v = v + Y[out]
                        if has_bias:
                            v = v + bias[r]
                        Y[out] = v


# --- tables.cuh and layers.cu -------------------------------------------------------------------------------------
def _reader(name: str) -> tuple[int, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """(BLOCK, load(row_bytes (..., bytes), b (...)) -> (..., BLOCK) float32) of a tables.cuh reader."""
    def f16(block):
        def load(row, b):
            idx = (2 * block * b)[..., None] + np.arange(2 * block)
            return f16_to_f32(np.take_along_axis(row, idx, -1).copy().view(np.uint16))
        return block, load

    def f32(block):
        def load(row, b):
            idx = (4 * block * b)[..., None] + np.arange(4 * block)
            return np.take_along_axis(row, idx, -1).copy().view(F32)
        return block, load

    def q8(row, b):
        idx = (34 * b)[..., None] + np.arange(34)
        raw = np.take_along_axis(row, idx, -1)
        scale = f16_to_f32(raw[..., :2].copy().view(np.uint16))
        return scale * raw[..., 2:].view(np.int8).astype(F32)

    def q4(grid):
        def load(row, b):
            idx = (18 * b)[..., None] + np.arange(18)
            raw = np.take_along_axis(row, idx, -1)
            scale = f16_to_f32(raw[..., :2].copy().view(np.uint16))
            nib = raw[..., 2:].astype(np.int32)
            return scale * np.asarray(grid, F32)[np.concatenate([nib & 0xF, nib >> 4], axis=-1)]
        return 32, load

    iq4_nl = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # tables.cuh's IQ4_NL_GRID
    return {"F16x8": f16(8), "F16x1": f16(1), "F32x4": f32(4), "F32x1": f32(1), "Q8_0": (32, q8),
            "Q4_0": q4(range(-8, 8)), "IQ4_NL": q4(iq4_nl)}[name]


def embed(reader):
    block_, load = _reader(reader)

    def kernel(grid, blk, shared, table, row_bytes, row_of, vocab, ids, tokens, d, scale, out):
        ids, out = flat(ids), flat(out)
        per_row = d // block_
        idx = np.arange(grid[0] * blk[0], dtype=np.int64)
        idx = idx[idx < tokens * per_row]
        t, b = idx // per_row, idx % per_row
        tid = ids[t]
        ok = (tid >= 0) & (tid < vocab)
        row = np.where(ok, row_of[np.where(ok, tid, 0)], 0)
        write = ~ok | (row >= 0)  # a token another table holds is left to that table's launch
        v = np.full((len(idx), block_), np.nan, F32)
        here = ok & (row >= 0)
        v[here] = load(table[row[here]], b[here])
        t, b, v = t[write], b[write], v[write]
        for i in range(block_):
            out[t * d + b * block_ + i] = v[:, i] * scale
    return kernel


def rms_norm(grid, block, shared, x, w, out, d, eps):
    x, w, out = flat(x), flat(w), flat(out)
    for row in range(grid[0]):
        xr = x[row * d:(row + 1) * d].copy()
        ss = F32((xr * xr).sum(dtype=F32))
        inv = F32(1.0 / np.sqrt(float(ss) / d + float(eps)))
        out[row * d:(row + 1) * d] = xr * inv * w


def rope_table(grid, block, shared, pos, inv_freq, half, tokens, cos_out, sin_out):
    pos, inv_freq, cos_out, sin_out = map(flat, (pos, inv_freq, cos_out, sin_out))
    idx = np.arange(grid[0] * block[0])
    idx = idx[idx < tokens * half]
    t, k = idx // half, idx % half
    angle = (pos[0] + t).astype(F32) * inv_freq[k]
    cos_out[idx] = np.cos(angle.astype(np.float64)).astype(F32)
    sin_out[idx] = np.sin(angle.astype(np.float64)).astype(F32)


def rope(grid, block, shared, x, cos_t, sin_t, out, tokens, heads, d):
    x, cos_t, sin_t, out = map(flat, (x, cos_t, sin_t, out))
    half = d // 2
    idx = np.arange(grid[0] * block[0], dtype=np.int64)
    idx = idx[idx < tokens * heads * half]
    k, t = idx % half, idx // half // heads
    base = idx // half * d
    a, b = x[base + k], x[base + k + half]
    c, s = cos_t[t * half + k], sin_t[t * half + k]
    out[base + k] = a * c - b * s
    out[base + k + half] = b * c + a * s


def kv_store(grid, block, shared, k, v, cache_k, cache_v, layer, pos, tokens, kv_heads, d, n_ctx):
    k, v, cache_k, cache_v, pos = map(flat, (k, v, cache_k, cache_v, pos))
    idx = np.arange(grid[0] * block[0], dtype=np.int64)
    idx = idx[idx < tokens * kv_heads * d]
    e, h, t = idx % d, idx // d % kv_heads, idx // d // kv_heads
    p = pos[0] + t
    ok = p < n_ctx
    dst = ((layer * kv_heads + h) * n_ctx + p) * d + e
    cache_k[dst[ok]] = k[idx[ok]]
    cache_v[dst[ok]] = v[idx[ok]]


def glu(gelu: bool):
    def kernel(grid, block, shared, gate, up, out, count):
        gate, up, out = flat(gate), flat(up), flat(out)
        idx = np.arange(grid[0] * block[0])
        idx = idx[idx < count]
        g = gate[idx]
        if gelu:
            a = F32(0.5) * g * (F32(1) + np.tanh(F32(0.7978845608028654) * (g + F32(0.044715) * g * g * g)))
        else:
            a = g / (F32(1) + np.exp(-g))
        out[idx] = a * up[idx]
    return kernel


# --- attention.cu -------------------------------------------------------------------------------------------------
ATT, ATT_WARPS, ATT_MAX = C["ATT_THREADS"], C["ATT_WARPS"], C["ATT_MAX_DIM"]


def attention(grid, block, shared, q, cache_k, cache_v, layer, pos, heads, kv_heads, d, n_ctx, window, scale, softcap,
              out):
    """Per (token, head) block: tiles of ATT keys; key j0 + jj belongs to warp jj % ATT_WARPS, which accumulates
    p·V over its keys into its own partial output; the partials are summed at the end."""
    q, cache_k, cache_v, pos, out = map(flat, (q, cache_k, cache_v, pos, out))
    assert block[0] == ATT and shared >= 4 * ATT_WARPS * d and d <= ATT_MAX
    for bid in range(grid[0]):
        t, h = bid // heads, bid % heads
        kvh = h // (heads // kv_heads)
        qp = min(int(pos[0]) + t, n_ctx - 1)
        lo = max(0, qp - window + 1) if window > 0 else 0
        n = qp + 1 - lo
        qs = q[(t * heads + h) * d:(t * heads + h + 1) * d].copy()
        kbase = ((layer * kv_heads + kvh) * n_ctx + lo) * d
        part = np.zeros((ATT_WARPS, d), F32)
        run_max, run_sum = F32(-np.inf), F32(0)
        for j0 in range(0, n, ATT):
            jj = np.arange(min(ATT, n - j0))
            keys = cache_k[kbase + (j0 + jj)[:, None] * d + np.arange(d)]
            s = (keys * qs).sum(axis=1, dtype=F32) * F32(scale)
            if softcap > 0:
                s = F32(softcap) * np.tanh(s / F32(softcap))
            new_max = max(run_max, s.max())
            corr = np.exp(F32(run_max - new_max))
            p = np.exp(s - new_max).astype(F32)
            run_sum = run_sum * corr + p.sum(dtype=F32)
            run_max = new_max
            vals = cache_v[kbase + (j0 + jj)[:, None] * d + np.arange(d)]
            part *= corr
            for w in range(ATT_WARPS):
                mine = jj % ATT_WARPS == w
                part[w] += (p[mine, None] * vals[mine]).sum(axis=0, dtype=F32)
        out[(t * heads + h) * d:(t * heads + h + 1) * d] = part.sum(axis=0, dtype=F32) / run_sum


# --- head.cu ------------------------------------------------------------------------------------------------------
HEAD_TOKENS, SEL, SORT, TOPK = C["HEAD_TOKENS"], C["SELECT_THREADS"], C["SORT_SIZE"], C["TOPK"]


def head(reader):
    block_, load = _reader(reader)

    def kernel(grid, blk, shared, table, row_bytes, rows, col_of, vocab, d, x, tokens, out):
        x, out = flat(x), flat(out)
        assert (grid[0] * blk[0]) // 32 >= rows
        pieces = d // block_
        for row in range(rows):  # one warp each; its lanes' pieces b = lane + 32i, vectorized
            b = np.arange(pieces)
            lane = b % 32
            v = load(np.broadcast_to(table[row], (pieces, table.shape[1])), b)  # (pieces, BLOCK)
            for t0 in range(0, tokens, HEAD_TOKENS):
                for tt in range(min(HEAD_TOKENS, tokens - t0)):
                    xr = x[(t0 + tt) * d:(t0 + tt + 1) * d].reshape(pieces, block_)
                    per_lane = np.zeros(32, F32)
                    np.add.at(per_lane, lane, (v * xr).sum(axis=1, dtype=F32))
                    out[(t0 + tt) * vocab + col_of[row]] = per_lane.sum(dtype=F32)
    return kernel


def penalize(grid, block, shared, logits, seen, vocab, penalty):
    logits, seen = flat(logits), flat(seen)
    i = np.arange(grid[0] * block[0])
    i = i[(i < vocab)]
    i = i[seen[i] != 0]
    z = logits[i]
    logits[i] = np.where(z > 0, z / F32(penalty), z * F32(penalty))


def mark_seen(grid, block, shared, seen, token, vocab):
    seen, token = flat(seen), flat(token)
    if 0 <= token[0] < vocab:
        seen[token[0]] = 1


def _order(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices that put (value, id) pairs in `before` order: larger first, lower id among equals."""
    return np.lexsort((ids, -values.astype(np.float64)))


def argmax(grid, block, shared, logits, vocab, part_val, part_idx, counter, token):
    logits, part_val, part_idx, token = map(flat, (logits, part_val, part_idx, token))
    assert block[0] == SEL
    for bid in range(grid[0]):
        i = np.arange(vocab)
        mine = (i % (grid[0] * SEL)) // SEL == bid  # this block's grid-stride share
        v = np.where(np.isnan(logits[i[mine]]), -np.inf, logits[i[mine]]).astype(F32)
        if len(v):
            o = _order(v, i[mine])[0]
            part_val[bid], part_idx[bid] = v[o], i[mine][o]
        else:
            part_val[bid], part_idx[bid] = -np.inf, 0x7FFFFFFF
        if last_block(counter, grid[0]):
            o = _order(part_val[:grid[0]], part_idx[:grid[0]])[0]
            token[0] = part_idx[o] if part_idx[o] < vocab else 0


def bitonic_sort(sv: np.ndarray, si: np.ndarray) -> None:
    """The bitonic network of head.cu, one compare-exchange stage at a time."""
    i = np.arange(SORT)
    k = 2
    while k <= SORT:
        j = k >> 1
        while j > 0:
            o = i ^ j
            sel = o > i
            a, b = i[sel], o[sel]
            first = (a & k) == 0
            b_before = (sv[b] > sv[a]) | ((sv[b] == sv[a]) & (si[b] < si[a]))
            a_before = (sv[a] > sv[b]) | ((sv[a] == sv[b]) & (si[a] < si[b]))
            swap = np.where(first, b_before, a_before)
            sa, sb = a[swap], b[swap]
            sv[sa], sv[sb] = sv[sb].copy(), sv[sa].copy()
            si[sa], si[sb] = si[sb].copy(), si[sa].copy()
            j >>= 1
        k <<= 1


def topk(grid, block, shared, logits, vocab, slice_, part_val, part_idx, counter, top_val, top_idx):
    logits, part_val, part_idx, top_val, top_idx = map(flat, (logits, part_val, part_idx, top_val, top_idx))
    assert block[0] == SEL and slice_ <= SORT and grid[0] * TOPK <= SORT
    for bid in range(grid[0]):
        start = bid * slice_
        i = np.arange(SORT)
        real = (i < slice_) & (start + i < vocab)
        src = logits[np.minimum(start + i, vocab - 1)]
        sv = np.where(real, np.where(np.isnan(src), -np.inf, src), -np.inf).astype(F32)
        si = np.where(real, start + i, 0x7FFFFFFF).astype(np.int32)
        bitonic_sort(sv, si)
        part_val[bid * TOPK:(bid + 1) * TOPK] = sv[:TOPK]
        part_idx[bid * TOPK:(bid + 1) * TOPK] = si[:TOPK]
        if last_block(counter, grid[0]):
            real = i < grid[0] * TOPK
            sv = np.where(real, part_val[np.minimum(i, SORT - 1)], -np.inf).astype(F32)
            si = np.where(real, part_idx[np.minimum(i, SORT - 1)], 0x7FFFFFFF).astype(np.int32)
            bitonic_sort(sv, si)
            top_val[:TOPK] = sv[:TOPK]
            top_idx[:TOPK] = si[:TOPK]


KERNELS: dict[str, Callable] = {
    "repack_signs": repack_signs, "binary_gemv": binary_gemv, "binary_gemm": binary_gemm, "rms_norm": rms_norm,
    "rope_table": rope_table, "rope": rope, "kv_store": kv_store, "glu<false>": glu(False), "glu<true>": glu(True),
    "attention": attention, "penalize": penalize, "mark_seen": mark_seen, "argmax": argmax, "topk": topk,
    **{f"embed<{r}>": embed(r) for r, _ in sum(kernels.TABLE_READERS.values(), ())},
    **{f"head<{r}>": head(r) for r, _ in sum(kernels.TABLE_READERS.values(), ())},
}


class EmulatedDevice:
    """The Device interface of runtime/backends/cuda.py over numpy and the transliterations above."""

    xp = np
    name = "numpy emulation of the CUDA kernels"

    def __init__(self) -> None:
        self.launches: list[str] = []

    def launch(self, name: str, grid, block: int, args: tuple, shared_mem: int = 0) -> None:
        self.launches.append(name)
        grid = grid if isinstance(grid, tuple) else (grid,)
        KERNELS[name](grid, (block,), shared_mem, *[a.item() if isinstance(a, np.generic) else a for a in args])

    def to_device(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True, order="C")

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        return step

    def memory_reserved(self) -> int:
        return 0
