// Warp-level tensor-core products: `mma.sync.aligned.m16n8k16` on bf16 or f16 operands with f32
// accumulators (sm_80 and later), the register fragments they read, and 16-bit pairs packed in
// 32-bit words. On the CPU emulation (`RETORT_EMULATE`) the product is computed from the 32
// lanes' fragments, exchanged through the warp, by the layout the PTX ISA documents; so a kernel
// that fills its fragments from the wrong elements fails its emulated test.
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

// The word at `p` (4-byte aligned) of a shared-memory tile of 16-bit values, and its store.
template <typename H> __device__ __forceinline__ uint32_t word_at(const H* p) {
#ifdef RETORT_EMULATE
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}
template <typename H> __device__ __forceinline__ void put_word(H* p, uint32_t w) {
#ifdef RETORT_EMULATE
  std::memcpy(p, &w, 4);
#else
  *reinterpret_cast<uint32_t*>(p) = w;
#endif
}

// Copies 8 16-bit values (16 bytes, both addresses 16-byte aligned), or writes 8 zeros.
template <typename H> __device__ __forceinline__ void copy8(H* to, const H* from) {
#ifdef RETORT_EMULATE
  if (from) std::memcpy(to, from, 16);
  else std::memset(to, 0, 16);
#else
  *reinterpret_cast<uint4*>(to) = from ? *reinterpret_cast<const uint4*>(from) : make_uint4(0, 0, 0, 0);
#endif
}

// The A fragment of rows `r0..r0+15`, columns `k0..k0+15` of a row-major tile with row pitch
// `ld` (in values).
template <typename H>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const H* tile, int ld, int r0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const H* p = tile + (r0 + g) * ld + k0 + 2 * q;
  a[0] = word_at(p);
  a[1] = word_at(p + 8 * ld);
  a[2] = word_at(p + 8);
  a[3] = word_at(p + 8 * ld + 8);
}

// The B fragment of `n0..n0+7` by `k0..k0+15` from a tile stored row-major by n (each row one
// n, its k contiguous: `K [key][dim]` for `q k^T`, `V^T [dim][key]` for `P v`).
template <typename H>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const H* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const H* p = tile + (n0 + g) * ld + k0 + 2 * q;
  b[0] = word_at(p);
  b[1] = word_at(p + 8);
}

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
template <typename H> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
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
