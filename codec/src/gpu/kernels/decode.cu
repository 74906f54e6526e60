/* The current decode kernel (Kernel::Current), after prelude.cuh; see codec/src/gpu/kernel.rs
 * for how it works. Its tuning macros (UNROLL, UNROLL_WIDE, MIN_BLOCKS, EXC_SHARED) may be
 * defined before it (DecoderOptions::tuning). */

#define WARPS (THREADS / 32)
#define UNIT 8                /* values per thread and window */
#define WINDOW (32 * UNIT)    /* values per warp and window: 8 groups of 32 */
#ifndef UNROLL
#define UNROLL 2              /* windows a warp loads together when K <= 3 */
#endif
#ifndef UNROLL_WIDE
#define UNROLL_WIDE 1         /* the same when K >= 4 */
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 4              /* __launch_bounds__: registers for 4 blocks per SM (64) */
#endif

#ifndef EXC_SHARED
#define EXC_SHARED 4096       /* a chunk's exceptions are staged in shared memory up to this many */
#endif
#define EXC_VECS (EXC_SHARED > 0 ? EXC_SHARED / 16 : 1)

// byte_perm without the selector masking __byte_perm adds (every selector here has its nibbles'
// bit 3 clear, so plain prmt does the same).
__device__ __forceinline__ u32 perm(u32 a, u32 b, u32 s) {
#ifdef __CUDA_ARCH__
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
#else
    return __byte_perm(a, b, s);
#endif
}

// Exchanges the bits at positions p and p + d of x for every p in m.
__device__ __forceinline__ u32 swap_bits(u32 x, u32 m, u32 d) {
    const u32 t = ((x >> d) ^ x) & m;
    return x ^ t ^ (t << d);
}

// The escape flags of group g (bit l: value 32g + l has the escape code, i.e. all K code bits
// set), values at or past n cleared (only a chunk whose n is not a multiple of 32, `ragged`,
// has a group with such values). 0 for a group past the chunk (its words p are 0).
template <int K>
__device__ __forceinline__ u32 group_escapes(const u32 (&p)[K], u32 g, u32 n, bool ragged) {
    u32 e = p[0];
#pragma unroll
    for (int j = 1; j < K; j++) e &= p[j];
    const u32 first = 32u * g;
    if (ragged && first < n && n - first < 32u) e &= (1u << (n - first)) - 1u;
    return e;
}

template <int K>
__device__ __forceinline__ void load_planes(const u8* planes, u32 g, bool ok, u32 (&p)[K]) {
#pragma unroll
    for (int j = 0; j < K; j++) p[j] = ok ? ld32(planes + 4u * (g * K + j)) : 0u;
}

// Sign and mantissa bytes of 4 values, the low half of each output word pair: output word i
// of a value pair (a, b) is [lo(a), hi(a), lo(b), hi(b)]; this gives s & 0x7f in the low byte
// and s & 0x80 in the high byte of each value.
__device__ __forceinline__ u32 sign_mant(u32 s, u32 sel) {
    return perm(s, 0u, sel) & 0x807F807Fu;
}

// Decodes the 8 values of a thread when K <= 3. p: the K plane words of its group; sh: 8 x its
// quarter of the group; the codes of its 8 values are byte sh/8 of each word. tl/th: byte c is
// the low/high byte contribution of table entry c ((e << 7) & 0x80 and e >> 1), 0 for the
// escape code. o: the 4 output words (value pairs), exponent 0 where the value escapes.
template <int K>
__device__ __forceinline__ void unit_small(const u32 (&p)[K], u32 s_lo, u32 s_hi, u32 sh, u32 sel_a,
                                           u32 sel_b, u32 tl0, u32 tl1, u32 th0, u32 th1, u32 (&o)[4]) {
    // w: byte j = the thread's byte of plane j (bit l: bit j of value l's code), byte 3 = 0.
    u32 w;
    if constexpr (K == 1) w = (p[0] >> sh) & 0xffu;
    else if constexpr (K == 2) w = perm(p[0], p[1], sel_a) & 0xffffu;
    else w = perm(perm(p[0], p[1], sel_a), p[2], sel_b) & 0xffffffu;
    // Bit 8j + l -> bit 4n + j with n = 4 l1 + 2 l0 + l2 (l = 4 l2 + 2 l1 + l0): swaps of index
    // bits 0 <-> 3 and 1 <-> 4. Nibble n is then the code of value l: nibbles 0-3 hold values
    // 0, 4, 1, 5 and nibbles 4-7 values 2, 6, 3, 7, a byte_perm selector each.
    const u32 c = swap_bits(swap_bits(w, 0x00AA00AAu, 7), 0x0000CCCCu, 14);
    const u32 ch = c >> 16;
    const u32 xl = perm(tl0, tl1, c), xh = perm(tl0, tl1, ch);
    const u32 yl = perm(th0, th1, c), yh = perm(th0, th1, ch);
    o[0] = perm(xl, yl, 0x6240u) | sign_mant(s_lo, 0x1100u);  // values 0, 1
    o[1] = perm(xh, yh, 0x6240u) | sign_mant(s_lo, 0x3322u);  // values 2, 3
    o[2] = perm(xl, yl, 0x7351u) | sign_mant(s_hi, 0x1100u);  // values 4, 5
    o[3] = perm(xh, yh, 0x7351u) | sign_mant(s_hi, 0x3322u);  // values 6, 7
}

// Decodes the 8 values of a thread when K >= 4: an 8x8 bit transpose gives one code per byte,
// looked up in the shared table (whose escape entry is 0).
template <int K>
__device__ __forceinline__ void unit_wide(const u32 (&p)[K], u32 s_lo, u32 s_hi, u32 sh,
                                          const u8* table, u32 (&o)[4]) {
    u32 lo = 0u, hi = 0u;
#pragma unroll
    for (int j = 0; j < K; j++) {
        const u32 b = (p[j] >> sh) & 0xffu;
        if (j < 4) lo |= b << (8 * j); else hi |= b << (8 * (j - 4));
    }
    // 8x8 transpose of the 64-bit hi:lo (byte j bit l -> byte l bit j): index bits 0 <-> 3,
    // 1 <-> 4 within each half, then 2 <-> 5 across them.
    lo = swap_bits(swap_bits(lo, 0x00AA00AAu, 7), 0x0000CCCCu, 14);
    hi = swap_bits(swap_bits(hi, 0x00AA00AAu, 7), 0x0000CCCCu, 14);
    const u32 t = ((hi << 4) ^ lo) & 0xF0F0F0F0u;
    lo ^= t;
    hi ^= t >> 4;
    const u32 e_lo = (u32)table[lo & 0xffu] | ((u32)table[(lo >> 8) & 0xffu] << 8)
        | ((u32)table[(lo >> 16) & 0xffu] << 16) | ((u32)table[lo >> 24] << 24);
    const u32 e_hi = (u32)table[hi & 0xffu] | ((u32)table[(hi >> 8) & 0xffu] << 8)
        | ((u32)table[(hi >> 16) & 0xffu] << 16) | ((u32)table[hi >> 24] << 24);
    const u32 xl = (e_lo << 7) & 0x80808080u, yl = (e_lo >> 1) & 0x7F7F7F7Fu;
    const u32 xh = (e_hi << 7) & 0x80808080u, yh = (e_hi >> 1) & 0x7F7F7F7Fu;
    o[0] = perm(xl, yl, 0x5140u) | sign_mant(s_lo, 0x1100u);
    o[1] = perm(xl, yl, 0x7362u) | sign_mant(s_lo, 0x3322u);
    o[2] = perm(xh, yh, 0x5140u) | sign_mant(s_hi, 0x1100u);
    o[3] = perm(xh, yh, 0x7362u) | sign_mant(s_hi, 0x3322u);
}

// ORs the exponents of the escaped values among the thread's 8 (bit l of m: value l) into o,
// taken from exc (shared or global memory) in order from index idx (in bounds: the chunk's
// escapes were counted first).
__device__ __forceinline__ void patch_escapes(u32 m, u32 idx, const u8* exc, u32 (&o)[4]) {
    while (m) {
        const u32 l = (u32)__ffs(m) - 1u;
        m &= m - 1u;
        const u32 e = (u32)exc[idx++] << (7u + 16u * (l & 1u));
        const u32 h = l >> 1;
        o[0] |= h == 0u ? e : 0u;
        o[1] |= h == 1u ? e : 0u;
        o[2] |= h == 2u ? e : 0u;
        o[3] |= h == 3u ? e : 0u;
    }
}

// Two-tier chunks. The second-tier codes (k2 bits each, a little-endian bitstream) of the
// first-tier escapes j .. j + c - 1 (c <= 8, so at most 40 bits), code j at bit 0: read as 32-bit
// words of the section (16-byte aligned; `words` of them, padding included, in bounds), words
// past it as 0.
__device__ __forceinline__ u64 tier2_codes(const u8* t2, u32 words, u32 j, u32 k2) {
    const u32 bit = j * k2, w = bit >> 5, s = bit & 31u;
    const u32* p = (const u32*)t2;
    const u64 x = (u64)(w < words ? p[w] : 0u) | ((u64)(w + 1u < words ? p[w + 1u] : 0u) << 32);
    const u64 y = s ? (u64)(w + 2u < words ? p[w + 2u] : 0u) << (64u - s) : 0ull;
    return (x >> s) | y;
}

// How many of the c codes (k2 bits each, from bit 0 of x) are the second-tier escape.
__device__ __forceinline__ u32 tier2_escapes(u64 x, u32 c, u32 k2) {
    const u32 esc = (1u << k2) - 1u;
    u32 n = 0u;
    for (u32 i = 0; i < c; i++) {
        n += ((u32)x & esc) == esc ? 1u : 0u;
        x >>= k2;
    }
    return n;
}

// ORs the exponents of the first-tier escapes among the thread's 8 values (bit l of m: value l)
// into o: each takes the next of its second-tier codes x (k2 bits each, in value order), code
// d < 2^k2 - 1 stands for table2[d], the escape for the next exception from index idx (in
// bounds: the chunk's second-tier escapes were counted first).
__device__ __forceinline__ void patch_two_tier(u32 m, u64 x, u32 k2, u32 idx, const u8* table2,
                                               const u8* exc, u32 (&o)[4]) {
    const u32 esc = (1u << k2) - 1u;
    while (m) {
        const u32 l = (u32)__ffs(m) - 1u;
        m &= m - 1u;
        const u32 d = (u32)x & esc;
        x >>= k2;
        const u32 b = d == esc ? (u32)exc[idx++] : (u32)table2[d];
        const u32 e = b << (7u + 16u * (l & 1u));
        const u32 h = l >> 1;
        o[0] |= h == 0u ? e : 0u;
        o[1] |= h == 1u ? e : 0u;
        o[2] |= h == 2u ? e : 0u;
        o[3] |= h == 3u ? e : 0u;
    }
}

__device__ __forceinline__ void store_unit(u8* __restrict__ dst, u32 v, u32 n, const u32 (&o)[4]) {
    if (v + UNIT <= n) {
        v16 x; x.a = o[0]; x.b = o[1]; x.c = o[2]; x.d = o[3];
        *(v16*)(dst + 2ull * v) = x;
    } else {
        u16* d = (u16*)dst + v;
#pragma unroll
        for (u32 l = 0; l < UNIT; l++)
            if (v + l < n) d[l] = (u16)(o[l / 2] >> (16u * (l % 2u)));
    }
}

__device__ __forceinline__ u32 warp_sum(u32 x) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
    return x;
}

// Per-thread constants of the lane layout.
struct Lane {
    u32 tid, lane, warp;
    u32 sh;      // 8 x the thread's quarter of its group
    u32 below;   // the bits of the group's values before the thread's 8
    u32 sel_a;   // byte_perm: [byte of p0, byte of p1]
    u32 sel_b;   // byte_perm: [w byte 0, w byte 1, byte of p2]
};

// What a warp loads for U windows: each thread's K plane words of its group and its 8 sign and
// mantissa bytes per window.
template <int K, int U>
struct Loads {
    u32 p[U][K];
    u32 s_lo[U], s_hi[U];
};

// Decodes coded chunk (K code bits, n values, n_exc exceptions) at src into dst. Each warp
// takes a contiguous run of windows; it first counts its escapes (an AND of the K plane words
// per group) so that one barrier gives every warp its first exception index, then decodes its
// windows in order, U at a time, loading the next U while it decodes these, and keeps a running
// exception index with one scan over its 8 groups per U windows.
//
// TWO: a two-tier chunk (K = k1 first-tier code bits, n_exc = e1 first-tier escapes, k2
// second-tier code bits; e2, the second-tier escapes, is the chunk's first u32). The first-tier
// escape index that the count and scan give each escaped value is also the index of its
// second-tier code. A second count (over the warp's range of first-tier escape indices, a
// contiguous run of second-tier codes) and barrier give every warp its first exception index,
// and a second scan per U windows, of the second-tier escapes among each thread's codes, keeps
// a running exception index.
template <int K, int U, bool TWO>
__device__ __forceinline__ void decode_coded(const u8* __restrict__ src, u32 n, u32 n_exc, u32 k2, u8* __restrict__ dst,
                                             u8* table, u8* table2, u32* counts, u32* counts2, u8* exc_s,
                                             const Lane& ln, u32* __restrict__ status) {
    static_assert(U >= 1 && U <= 4, "the escape counts of U windows share one u64");
    static_assert(!TWO || K <= 4, "two-tier chunks have k1 <= 4");
    const u32 t = (1u << K) - 1u;
    const u32 t2 = TWO ? (1u << k2) - 1u : 0u;
    const u32 head = TWO ? 4u : 0u;  // the second-tier escape count before the tables
    const u8* planes = src + pad16(head + t + t2);
    const u32 groups = (n + 31u) / 32u;
    const u8* sm = planes + pad16(4ull * groups * K);
    const u8* tier2 = sm + pad16(n);  // two-tier: the second-tier codes
    const u32 tier2_len = TWO ? (u32)pad16(((u64)n_exc * k2 + 7ull) / 8ull) : 0u;
    const u8* exc = tier2 + tier2_len;
    const u32 n_exc2 = TWO ? ld32(src) : 0u;
    const bool ragged = (n & 31u) != 0u;

    const u32 windows = (n + WINDOW - 1u) / WINDOW;
    const u32 per_warp = (windows + WARPS - 1u) / WARPS;
    const u32 w0 = min32(ln.warp * per_warp, windows), w1 = min32(w0 + per_warp, windows);

    // Loads of windows win..win+U-1 (zeros past the warp's run or the chunk).
    auto load = [&](u32 win, Loads<K, U>& d) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const u32 v = (win + u) * WINDOW + ln.lane * UNIT;
            const u32 g = v / 32u;
            const bool in = win + u < w1;
            load_planes<K>(planes, g, in && g < groups, d.p[u]);
            d.s_lo[u] = 0u;
            d.s_hi[u] = 0u;
            if (in && v < n) {
                const uint2 s = __ldcs((const uint2*)(sm + v));
                d.s_lo[u] = s.x;
                d.s_hi[u] = s.y;
            }
        }
    };
    Loads<K, U> cur, next;
    load(w0, cur);

    // The chunk's exceptions (two-tier: its second-tier codes and exceptions, two contiguous
    // sections), if few enough, into shared memory (the sections are 16-byte aligned and
    // padded), read after the barrier below.
    static_assert(EXC_SHARED % 16 == 0 && EXC_SHARED <= 16 * THREADS, "one 16-byte copy per thread");
    const u32 stage_len = TWO ? tier2_len + (u32)pad16(n_exc2) : n_exc;
    const u8* stage_src = TWO ? tier2 : exc;
    const bool staged = stage_len <= EXC_SHARED;
    if (staged && ln.tid < (stage_len + 15u) / 16u) ((v16*)exc_s)[ln.tid] = ((const v16*)stage_src)[ln.tid];
    const u8* ex = staged ? (const u8*)exc_s + (TWO ? tier2_len : 0u) : exc;
    const u8* t2c = staged ? (const u8*)exc_s : tier2;  // two-tier: the second-tier codes
    if constexpr (TWO) {
        if (ln.tid < t2) table2[ln.tid] = src[head + t + ln.tid];
    }

    u32 tl0 = 0u, tl1 = 0u, th0 = 0u, th1 = 0u;
    if constexpr (K <= 3) {
        // The table section is at least 16 bytes (padded); keep entries 0..t-1, 0 at t.
        u32 t0 = ld32(src + head), t1 = ld32(src + head + 4);
        if constexpr (K == 1) { t0 &= 0xffu; t1 = 0u; }
        else if constexpr (K == 2) { t0 &= 0xffffffu; t1 = 0u; }
        else t1 &= 0xffffffu;
        tl0 = (t0 << 7) & 0x80808080u; tl1 = (t1 << 7) & 0x80808080u;
        th0 = (t0 >> 1) & 0x7F7F7F7Fu; th1 = (t1 >> 1) & 0x7F7F7F7Fu;
    } else if (ln.tid <= t) {
        table[ln.tid] = ln.tid < t ? src[head + ln.tid] : (u8)0;
    }

    // Escapes in the warp's windows.
    u32 count = 0;
    const u32 g_end = min32(w1 * (WINDOW / 32u), groups);
#pragma unroll 4
    for (u32 g = w0 * (WINDOW / 32u) + ln.lane; g < g_end; g += 32u) {
        u32 p[K];
        load_planes<K>(planes, g, true, p);
        count += __popc(group_escapes<K>(p, g, n, ragged));
    }
    count = warp_sum(count);
    if (ln.lane == 0u) counts[ln.warp] = count;
    __syncthreads();
    u32 base = 0u, total = 0u;
#pragma unroll
    for (u32 w = 0; w < WARPS; w++) {
        const u32 x = counts[w];
        base += w < ln.warp ? x : 0u;
        total += x;
    }
    if (total != n_exc) {
        if (ln.tid == 0u) raise_status(status, STATUS_EXCEPTIONS);
        return;
    }

    // Two-tier: the second-tier escapes among the warp's first-tier escapes (second-tier codes
    // base .. base + its count), then every warp's first exception index.
    u32 base2 = 0u;
    if constexpr (TWO) {
        const u32 words = tier2_len / 4u, esc2 = t2;
        const u32 end = base + counts[ln.warp];
        u32 c2 = 0u;
        for (u32 j = base + ln.lane; j < end; j += 32u)
            c2 += ((u32)tier2_codes(t2c, words, j, k2) & esc2) == esc2 ? 1u : 0u;
        c2 = warp_sum(c2);
        if (ln.lane == 0u) counts2[ln.warp] = c2;
        __syncthreads();
        u32 total2 = 0u;
#pragma unroll
        for (u32 w = 0; w < WARPS; w++) {
            const u32 x = counts2[w];
            base2 += w < ln.warp ? x : 0u;
            total2 += x;
        }
        if (total2 != n_exc2) {
            if (ln.tid == 0u) raise_status(status, STATUS_EXCEPTIONS);
            return;
        }
    }

    for (u32 win = w0; win < w1; win += U) {
        if (win + U < w1) load(win + U, next);
        u32 esc[U];
        u64 cg = 0;  // escapes of the thread's group per window, 16 bits each
#pragma unroll
        for (int u = 0; u < U; u++) {
            const u32 g = ((win + u) * WINDOW + ln.lane * UNIT) / 32u;
            esc[u] = group_escapes<K>(cur.p[u], g, n, ragged);
            cg |= (u64)__popc(esc[u]) << (16 * u);
        }
        // Inclusive scan over the warp's 8 groups (lanes 4g..4g+3 hold group g); a window has
        // at most 256 escapes, so the 16-bit fields never carry into each other.
        u64 incl = cg;
#pragma unroll
        for (u32 d = 4; d < 32u; d <<= 1) {
            const u64 y = __shfl_up_sync(0xffffffffu, incl, d);
            if (ln.lane >= d) incl += y;
        }
        const u64 tot = __shfl_sync(0xffffffffu, incl, 31);
        const u64 excl = incl - cg;
        // Two-tier: each thread's second-tier codes (those of its first-tier escapes), and an
        // inclusive scan of their escape counts, the same way.
        u64 codes[U];
        u32 idx2[U];
        if constexpr (TWO) {
            const u32 words = tier2_len / 4u;
            u64 cg2 = 0;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const u32 m = (esc[u] >> ln.sh) & 0xffu;
                const u32 j = base + (u32)((excl >> (16 * u)) & 0xffffu) + __popc(esc[u] & ln.below);
                base += (u32)((tot >> (16 * u)) & 0xffffu);
                codes[u] = m ? tier2_codes(t2c, words, j, k2) : 0ull;
                cg2 |= (u64)(m ? tier2_escapes(codes[u], __popc(m), k2) : 0u) << (16 * u);
            }
            u64 incl2 = cg2;
#pragma unroll
            for (u32 d = 1; d < 32u; d <<= 1) {
                const u64 y = __shfl_up_sync(0xffffffffu, incl2, d);
                if (ln.lane >= d) incl2 += y;
            }
            const u64 tot2 = __shfl_sync(0xffffffffu, incl2, 31);
            const u64 excl2 = incl2 - cg2;
#pragma unroll
            for (int u = 0; u < U; u++) {
                idx2[u] = base2 + (u32)((excl2 >> (16 * u)) & 0xffffu);
                base2 += (u32)((tot2 >> (16 * u)) & 0xffffu);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const u32 v = (win + u) * WINDOW + ln.lane * UNIT;
            u32 idx = 0u;
            if constexpr (!TWO) {
                idx = base + (u32)((excl >> (16 * u)) & 0xffffu) + __popc(esc[u] & ln.below);
                base += (u32)((tot >> (16 * u)) & 0xffffu);
            }
            if (win + u < w1 && v < n) {
                u32 o[4];
                if constexpr (K <= 3)
                    unit_small<K>(cur.p[u], cur.s_lo[u], cur.s_hi[u], ln.sh, ln.sel_a, ln.sel_b, tl0, tl1, th0, th1, o);
                else
                    unit_wide<K>(cur.p[u], cur.s_lo[u], cur.s_hi[u], ln.sh, table, o);
                const u32 m = (esc[u] >> ln.sh) & 0xffu;
                if constexpr (TWO) {
                    if (m) patch_two_tier(m, codes[u], k2, idx2[u], table2, ex, o);
                } else {
                    if (m) patch_escapes(m, idx, ex, o);
                }
                store_unit(dst, v, n, o);
            }
        }
        cur = next;
    }
}

// Directory entry c: its chunk's offset, exceptions, mode | k << 8 | k2 << 16 | reserved << 24, and where
// the chunk must end (the next chunk's offset, or enc_len for the last one).
struct Entry {
    u64 off, next;
    u32 n_exc, mk;
};

__device__ __forceinline__ Entry load_entry(const u8* enc, u32 c, u32 n_chunks, u64 enc_len) {
    const u8* entry = enc + (u64)HEADER_BYTES + (u64)ENTRY_BYTES * c;
    Entry e;
    e.off = ld64(entry);
    e.n_exc = ld32(entry + 8);
    e.mk = ld32(entry + 12);
    e.next = c + 1u < n_chunks ? ld64(entry + 16) : enc_len;
    return e;
}

// Decodes the encoding at `enc` (`enc_len` bytes, 16-byte aligned) into `out` (`out_len`
// bytes, 16-byte aligned). `status` (may be null) collects STATUS_* bits of what was refused.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
lwbc_decode(const u8* __restrict__ enc, u64 enc_len, u8* __restrict__ out, u64 out_len, u32* __restrict__ status)
{
    // Double-buffered by chunk parity, so that one barrier per chunk suffices: a warp still
    // decoding chunk i reads buffer i % 2 while others fill buffer (i + 1) % 2, and none can
    // fill buffer i % 2 again before every warp has passed chunk i + 1's barrier.
    __shared__ u8 tables[2][128];
    __shared__ u8 tables2[2][32];
    __shared__ u32 counts[2][WARPS];
    __shared__ u32 counts2[2][WARPS];
    __shared__ v16 exceptions[2][EXC_VECS];
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

    Lane ln;
    ln.tid = tid;
    ln.lane = tid & 31u;
    ln.warp = tid >> 5;
    const u32 q = ln.lane & 3u;
    ln.sh = 8u * q;
    ln.below = (1u << ln.sh) - 1u;
    ln.sel_a = q | ((4u + q) << 4);
    ln.sel_b = 0x10u | ((4u + q) << 8);
    u32 parity = 0;
    // The block's next directory entry is loaded one chunk ahead.
    Entry ahead = load_entry(enc, blockIdx.x, n_chunks, enc_len);
    for (u32 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const Entry e = ahead;
        if (c + gridDim.x < n_chunks) ahead = load_entry(enc, c + gridDim.x, n_chunks, enc_len);
        const u64 off = e.off;
        const u32 n_exc = e.n_exc;
        const u32 mk = e.mk;
        const u32 mode = mk & 0xffu, k = (mk >> 8) & 0xffu, k2 = (mk >> 16) & 0xffu;
        const u64 first = (u64)c * cv;
        const u32 n = (u32)min64((u64)cv, n_values - first);
        const u64 next = e.next;
        const u32 t = mode == 1u && k >= 1u && k <= 7u && k2 == 0u ? (1u << k) - 1u
            : mode == 2u && k >= 1u && k <= 4u && k2 >= 1u && k2 <= 5u ? (1u << k) - 1u : 0u;
        const u64 planes_len = 4ull * ((n + 31u) / 32u) * k;
        u64 size = 0;
        bool ok = (off & 15ull) == 0 && (mk >> 24) == 0 && off >= data_offset && off <= enc_len;
        if (mode == 0u) {
            size = pad16(2ull * n);
            ok = ok && k == 0u && k2 == 0u && n_exc == 0u;
        } else if (mode == 1u && t != 0u && n_exc <= n) {
            size = pad16(t) + pad16(planes_len) + pad16(n) + pad16(n_exc);
        } else if (mode == 2u && t != 0u && n_exc <= n && ok && enc_len - off >= 16ull) {
            // The second-tier escape count, the chunk's first u32 (its tables section is at
            // least 16 bytes, inside the buffer).
            const u32 n_exc2 = ld32(enc + off);
            size = pad16(4ull + t + ((1u << k2) - 1u)) + pad16(planes_len) + pad16(n)
                + pad16(((u64)n_exc * k2 + 7ull) / 8ull) + pad16(n_exc2);
            ok = ok && n_exc2 <= n_exc;
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
        u8* table = tables[parity];
        u8* table2 = tables2[parity];
        u32* cnt = counts[parity];
        u32* cnt2 = counts2[parity];
        u8* exc_s = (u8*)exceptions[parity];
        parity ^= 1u;
#define ARGS src, n, n_exc, k2, dst, table, table2, cnt, cnt2, exc_s, ln, status
        if (mode == 1u) {
            // One tier: the layout of format version 2, today's fast path.
            switch (k) {
                case 1: decode_coded<1, UNROLL, false>(ARGS); break;
                case 2: decode_coded<2, UNROLL, false>(ARGS); break;
                case 3: decode_coded<3, UNROLL, false>(ARGS); break;
                case 4: decode_coded<4, UNROLL_WIDE, false>(ARGS); break;
                case 5: decode_coded<5, UNROLL_WIDE, false>(ARGS); break;
                case 6: decode_coded<6, UNROLL_WIDE, false>(ARGS); break;
                default: decode_coded<7, UNROLL_WIDE, false>(ARGS); break;
            }
        } else {
            switch (k) {
                case 1: decode_coded<1, UNROLL, true>(ARGS); break;
                case 2: decode_coded<2, UNROLL, true>(ARGS); break;
                case 3: decode_coded<3, UNROLL, true>(ARGS); break;
                default: decode_coded<4, UNROLL_WIDE, true>(ARGS); break;
            }
        }
#undef ARGS
    }
}
