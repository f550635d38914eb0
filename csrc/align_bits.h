// The bit-parallel column step shared by the CPU and CUDA kernels (no torch).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define GAPFIX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GAPFIX_HOST_DEVICE inline
#endif

namespace gapfix {

// Advances one 64-bit word of the column (VP/VN bit i set when
// D[t][j0+i+1] - D[t][j0+i] = +1 / -1) by one text symbol: Myers' step in
// Hyyro's block form. eq: match bits of the symbol in this word; hin: the
// horizontal delta D[t][j0] - D[t-1][j0] entering at the word's top boundary
// (+1 for the first word: D[t][0] = t). Returns the delta leaving at bit 63.
GAPFIX_HOST_DEVICE int advance_word(uint64_t& vp, uint64_t& vn, uint64_t eq, int hin) {
  const uint64_t hin_neg = hin < 0 ? 1 : 0;
  const uint64_t hin_pos = hin > 0 ? 1 : 0;
  const uint64_t xv = eq | vn;
  eq |= hin_neg;
  const uint64_t xh = (((eq & vp) + vp) ^ vp) | eq;
  uint64_t hp = vn | ~(xh | vp);
  uint64_t hn = vp & xh;
  const int hout = static_cast<int>(hp >> 63) - static_cast<int>(hn >> 63);
  hp = (hp << 1) | hin_pos;
  hn = (hn << 1) | hin_neg;
  vp = hn | ~(xv | hp);
  vn = hp & xv;
  return hout;
}

// Prefix statistics of the first `bits` positions of a (VP, VN) chunk: the
// total delta, the minimum over its prefix sums (lengths 1..bits) and the
// first / last position reaching it. The kernels tabulate it per 8-bit (CPU)
// or 4-bit (CUDA) chunk to scan a word's values without a per-bit loop.
struct ChunkStats {
  int sum, min_prefix, first, last;
};

GAPFIX_HOST_DEVICE ChunkStats chunk_stats(unsigned vp, unsigned vn, int bits) {
  ChunkStats s{0, 1 << 20, 0, 0};
  for (int p = 0; p < bits; ++p) {
    s.sum += static_cast<int>((vp >> p) & 1u) - static_cast<int>((vn >> p) & 1u);
    if (s.sum < s.min_prefix) {
      s.min_prefix = s.sum;
      s.first = s.last = p;
    } else if (s.sum == s.min_prefix) {
      s.last = p;
    }
  }
  return s;
}

}  // namespace gapfix
