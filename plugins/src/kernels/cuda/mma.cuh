// Warp-level tensor-core products: `mma.sync.aligned.m16n8k16` on bf16 or f16 operands with f32
// accumulators (sm_80 and later), the register fragments they read (loaded from shared memory
// by `ldmatrix`), 16-bit pairs packed in 32-bit words, and `cp.async` copies into shared
// memory. On the CPU emulation (`RETORT_EMULATE`) the product and the loads are computed from
// the 32 lanes' fragments and addresses, exchanged through the warp, by the layouts the PTX ISA
// documents; so a kernel that fills its fragments from the wrong elements fails its emulated
// test.
//
// Fragments of one 16 x 8 x 16 product `D = A B + D` (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), with lane `l`, `g = l / 4`, `q = l % 4`; a word holds
// two consecutive-column (A) or consecutive-k (B) values, the lower index in its low half:
// - A (16 x 16, row-major by m): a[0] = (m g, k 2q..2q+1), a[1] = (m g+8, k 2q..), a[2] =
//   (m g, k 2q+8..), a[3] = (m g+8, k 2q+8..);
// - B (16 x 8, k by n): b[0] = (k 2q..2q+1, n g), b[1] = (k 2q+8.., n g);
// - D (16 x 8, f32): d[0] = (m g, n 2q), d[1] = (m g, n 2q+1), d[2] = (m g+8, n 2q),
//   d[3] = (m g+8, n 2q+1).
#pragma once
#include "common.cuh"

namespace retort {

// The 16 bits of a half value.
__device__ __forceinline__ uint32_t half_bits(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
__device__ __forceinline__ uint32_t half_bits(__half h) { return __half_as_ushort(h); }

// `lo` and `hi` rounded to the 16-bit type `H` in one word (`lo` in the low half).
template <typename H> __device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  return half_bits(store<H, float>(lo)) | (half_bits(store<H, float>(hi)) << 16);
}

// ---- shared-memory fragment loads: ldmatrix ----
//
// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` loads four 8 x 8 matrices of 16-bit values
// from shared memory: lanes 8i .. 8i + 7 give the addresses of matrix i's 8 rows (16 bytes
// each, 16-byte aligned) and register i of lane `l` receives matrix i's (row g, columns 2q,
// 2q + 1), or with `.trans` its (rows 2q, 2q + 1, column g): the fragment of the transposed
// matrix.

#ifdef RETORT_EMULATE
template <bool TRANS, typename H> inline void ldmatrix_x4(uint32_t (&r)[4], const H* row) {
  const H* all[32];
  retort_emu::warp_exchange(&row, all, sizeof row);
  const int lane = retort_emu::lane_id(), g = lane >> 2, q = lane & 3;
  for (int m = 0; m < 4; ++m) {
    const H lo = TRANS ? all[8 * m + 2 * q][g] : all[8 * m + g][2 * q];
    const H hi = TRANS ? all[8 * m + 2 * q + 1][g] : all[8 * m + g][2 * q + 1];
    r[m] = half_bits(lo) | (half_bits(hi) << 16);
  }
}
#else
template <bool TRANS, typename H> __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const H* row) {
  const unsigned at = (unsigned)__cvta_generic_to_shared(row);
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  }
}
#endif

// The A fragment of rows `r0 .. r0 + 15`, columns `k0 .. k0 + 15` of a row-major tile of row
// pitch `ld` (values; rows 16-byte aligned, `k0` a multiple of 8).
template <typename H>
__device__ __forceinline__ void fragment_a(uint32_t (&a)[4], const H* tile, int ld, int r0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4<false>(a, tile + (r0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + k0 + 8 * (lane >> 4));
}

// The B fragments of the n-tiles `n0 ..` and `n0 + 8 ..` (`b[0..1]`, `b[2..3]`) over
// `k0 .. k0 + 15`, from a tile stored by n (row `n`, its k contiguous: `K [key][dim]` in
// `q k^T`).
template <typename H>
__device__ __forceinline__ void fragments_b(uint32_t (&b)[4], const H* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4<false>(b, tile + (n0 + (lane & 7) + 8 * (lane >> 4)) * ld + k0 + 8 * ((lane >> 3) & 1));
}

// The same from a tile stored by k (row `k`, its n contiguous: `V [key][dim]` in `P v`),
// transposed on the load.
template <typename H>
__device__ __forceinline__ void fragments_b_trans(uint32_t (&b)[4], const H* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4<true>(b, tile + (k0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + n0 + 8 * (lane >> 4));
}

// ---- asynchronous copies to shared memory: cp.async ----
//
// `cp_async16` starts a 16-byte copy from global to shared memory (zeros where `!valid`: then
// nothing is read, `from` need only be a global address), `cp_async_commit` closes the thread's
// group of started copies, and `cp_async_wait(n)` waits until at most `n` (0 or 1) of its
// committed groups are pending. A copy is visible to the other threads after the issuing
// thread's wait and a barrier. The emulation performs a group's copies at the wait that
// retires it, so a tile read before its wait reads stale values there too.

#ifdef RETORT_EMULATE
template <typename H> inline void cp_async16(H* to, const H* from, bool valid) {
  retort_emu::async_copy(to, valid ? from : nullptr, 16);
}
inline void cp_async_commit() { retort_emu::async_commit(); }
inline void cp_async_wait(int pending) { retort_emu::async_wait(pending); }
#else
template <typename H> __device__ __forceinline__ void cp_async16(H* to, const H* from, bool valid) {
  const unsigned at = (unsigned)__cvta_generic_to_shared(to);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(at), "l"(from), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait(int pending) {
  if (pending >= 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  }
}
#endif

#ifdef RETORT_EMULATE
template <typename H> inline float half_value(uint32_t bits) {
  H h;
  h.bits = (uint16_t)bits;
  return load(h);
}

// The product on the CPU: every lane reads the warp's A and B fragments and sums its four
// elements of D in f32 (the tensor cores' order of summation is unspecified; results agree to
// rounding).
template <typename H> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]}, all[32][6];
  retort_emu::warp_exchange(mine, all, sizeof mine);
  float am[16][16], bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    for (int half = 0; half < 2; ++half) {
      const int k = 2 * q + half, sh = 16 * half;
      am[g][k] = half_value<H>(all[l][0] >> sh);
      am[g + 8][k] = half_value<H>(all[l][1] >> sh);
      am[g][k + 8] = half_value<H>(all[l][2] >> sh);
      am[g + 8][k + 8] = half_value<H>(all[l][3] >> sh);
      bm[k][g] = half_value<H>(all[l][4] >> sh);
      bm[k + 8][g] = half_value<H>(all[l][5] >> sh);
    }
  }
  const int lane = retort_emu::lane_id(), g = lane >> 2, q = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i >> 1), n = 2 * q + (i & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += am[m][k] * bm[k][n];
    d[i] += sum;
  }
}
#else
template <typename H>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

}  // namespace retort
