/* The first decode kernel (Kernel::Baseline), after prelude.cuh, kept to measure the current
 * one against: runtime k, a block-wide scan per 8192 values. */

#define UNIT 8
#define ROUNDS 4
#define ROUND_VALUES (THREADS * UNIT)
#define STEP_VALUES (ROUND_VALUES * ROUNDS)

// Decodes the encoding at `enc` (`enc_len` bytes, 16-byte aligned) into `out` (`out_len`
// bytes, 16-byte aligned). `status` (may be null) collects STATUS_* bits of what was refused.
extern "C" __global__ void __launch_bounds__(THREADS)
lwbc_decode(const u8* __restrict__ enc, u64 enc_len, u8* __restrict__ out, u64 out_len, u32* __restrict__ status)
{
    __shared__ u8 table[128];
    __shared__ u64 warp_sums[THREADS / 32];
    const u32 tid = threadIdx.x;
    const bool leader = blockIdx.x == 0 && tid == 0;

    // Header (HEADER_BYTES), read by every block.
    if (enc_len < HEADER_BYTES) { if (leader) raise_status(status, STATUS_HEADER); return; }
    const u32 magic = ld32(enc);
    const u32 w1 = ld32(enc + 4);
    const u32 cv = ld32(enc + 8);
    const u32 n_chunks = ld32(enc + 12);
    const u64 n_values = ld64(enc + 16);
    const u64 encoded_len = ld64(enc + 24);
    const u32 version = w1 & 0xffffu, tail_len = (w1 >> 16) & 0xffu, tail_byte = w1 >> 24;
    const u64 data_offset = (u64)HEADER_BYTES + (u64)ENTRY_BYTES * n_chunks;
    const bool header_ok = magic == FORMAT_MAGIC && version == FORMAT_VERSION && tail_len <= 1u
        && cv >= MIN_CHUNK_VALUES && cv <= MAX_CHUNK_VALUES && cv % MIN_CHUNK_VALUES == 0u && n_values <= (~0ull >> 2)
        && (u64)n_chunks == (n_values + cv - 1) / cv && encoded_len == enc_len
        && n_values * 2ull + tail_len == out_len && data_offset <= enc_len;
    if (!header_ok) { if (leader) raise_status(status, STATUS_HEADER); return; }
    if (leader && tail_len) out[n_values * 2ull] = (u8)tail_byte;

    const u32 lane = tid & 31u, warp = tid >> 5;
    for (u32 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        // Directory entry: offset, exceptions, mode | k << 8 | reserved << 16.
        const u8* entry = enc + (u64)HEADER_BYTES + (u64)ENTRY_BYTES * c;
        const u64 off = ld64(entry);
        const u32 n_exc = ld32(entry + 8);
        const u32 mk = ld32(entry + 12);
        const u32 mode = mk & 0xffu, k = (mk >> 8) & 0xffu;
        const u64 first = (u64)c * cv;
        const u32 n = (u32)min64((u64)cv, n_values - first);
        const u64 next = c + 1u < n_chunks ? ld64(entry + 16) : enc_len;
        const u32 t = mode == 1u && k >= 1u && k <= 7u ? (1u << k) - 1u : 0u;
        const u64 planes_len = 4ull * ((n + 31u) / 32u) * k;
        u64 size = 0;
        bool ok = (off & 15ull) == 0 && (mk >> 16) == 0 && off >= data_offset && off <= enc_len;
        if (mode == 0u) {
            size = pad16(2ull * n);
            ok = ok && k == 0u && n_exc == 0u;
        } else if (t != 0u && n_exc <= n) {
            size = pad16(t) + pad16(planes_len) + pad16(n) + pad16(n_exc);
        } else {
            ok = false;
        }
        ok = ok && size <= enc_len - off && off + size == next;
        if (!ok) { if (tid == 0) raise_status(status, STATUS_CHUNK); continue; }

        const u8* src = enc + off;
        u8* dst = out + first * 2ull;
        if (mode == 0u) {
            const u64 bytes = 2ull * n, vecs = bytes / 16ull;
            for (u64 i = tid; i < vecs; i += THREADS) ((v16*)dst)[i] = ((const v16*)src)[i];
            for (u64 i = vecs * 16ull + tid; i < bytes; i += THREADS) dst[i] = src[i];
            continue;
        }

        if (tid < t) table[tid] = src[tid];
        const u8* planes = src + pad16(t);
        const u8* sm = planes + pad16(planes_len);
        const u8* exc = sm + pad16(n);
        __syncthreads();

        u32 exc_base = 0;
        bool exc_bad = false;
        for (u32 base = 0; base < n; base += STEP_VALUES) {
            u64 bits[ROUNDS];   // byte j: bit j of the codes of the thread's 8 values
            u32 esc[ROUNDS];    // the thread's escaped values, one bit each
            u64 counts = 0;     // escapes per round, 16 bits each
#pragma unroll
            for (int r = 0; r < ROUNDS; r++) {
                const u32 v = base + r * ROUND_VALUES + tid * UNIT;
                bits[r] = 0;
                esc[r] = 0;
                if (v < n) {
                    const u32 g = v / 32u, shift = v % 32u;
                    const u32 lanes = min32(n - v, (u32)UNIT);
                    u32 e = lanes == UNIT ? 0xffu : (1u << lanes) - 1u;
                    for (u32 j = 0; j < k; j++) {
                        const u32 b = (ld32(planes + 4u * (g * k + j)) >> shift) & 0xffu;
                        bits[r] |= (u64)b << (8u * j);
                        e &= b;
                    }
                    esc[r] = e;
                    counts |= (u64)__popc(e) << (16 * r);
                }
            }
            // Block-wide exclusive scan of the packed counts (a round's total is at most 2048,
            // so the 16-bit fields never carry into each other).
            u64 incl = counts;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const u64 y = __shfl_up_sync(0xffffffffu, incl, d);
                if (lane >= (u32)d) incl += y;
            }
            if (lane == 31u) warp_sums[warp] = incl;
            __syncthreads();
            u64 before = 0, total = 0;
#pragma unroll
            for (u32 w = 0; w < THREADS / 32; w++) {
                const u64 s = warp_sums[w];
                if (w < warp) before += s;
                total += s;
            }
            const u64 excl = before + incl - counts;

            u32 round_base = exc_base;
#pragma unroll
            for (int r = 0; r < ROUNDS; r++) {
                const u32 v = base + r * ROUND_VALUES + tid * UNIT;
                u32 idx = round_base + (u32)((excl >> (16 * r)) & 0xffffu);
                round_base += (u32)((total >> (16 * r)) & 0xffffu);
                if (v < n) {
                    const u32 lanes = min32(n - v, (u32)UNIT);
                    const u64 s8 = ld64(sm + v);
                    u32 w[4];
#pragma unroll
                    for (int l = 0; l < UNIT; l++) {
                        u32 code = 0;
                        for (u32 j = 0; j < k; j++) code |= (u32)((bits[r] >> (8u * j + l)) & 1ull) << j;
                        u32 e;
                        if ((esc[r] >> l) & 1u) {
                            if (idx < n_exc) e = exc[idx]; else { e = 0; exc_bad = true; }
                            idx++;
                        } else {
                            e = table[code];
                        }
                        const u32 s = (u32)(s8 >> (8 * l)) & 0xffu;
                        const u32 val = ((s & 0x80u) << 8) | (e << 7) | (s & 0x7fu);
                        if (l % 2 == 0) w[l / 2] = val; else w[l / 2] |= val << 16;
                    }
                    if (lanes == UNIT) {
                        v16 o; o.a = w[0]; o.b = w[1]; o.c = w[2]; o.d = w[3];
                        *(v16*)(dst + 2ull * v) = o;
                    } else {
                        for (u32 l = 0; l < lanes; l++) ((u16*)dst)[v + l] = (u16)(w[l / 2] >> (16 * (l % 2)));
                    }
                }
            }
            exc_base = round_base;
            __syncthreads();  // warp_sums is written again in the next step
        }
        if (exc_bad || (tid == 0 && exc_base != n_exc)) raise_status(status, STATUS_EXCEPTIONS);
        __syncthreads();  // table is written again for the next chunk
    }
}
