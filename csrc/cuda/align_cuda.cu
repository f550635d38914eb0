// CUDA kernels of the batched prefix alignment (outputs: see csrc/align.h).
// Compiles without torch headers; csrc/cuda/align_cuda_binding.cpp computes
// the dense symbols, allocates the scratch and calls the launcher below.
//
// Same bit-parallel formulation as the CPU kernel (csrc/align_cpu.cpp): row t
// of D is two bit-vectors over the reference, VP/VN bit j-1 set when
// D[t][j] - D[t][j-1] = +1 / -1, advanced one generated token at a time. The
// GPU runs the full matrix (no band); outputs are exact, hence identical to
// the CPU's. Four launches per chunk of pairs:
//   1. peq_kernel: match bit-vectors Peq[b][sym][word] (after clearing the
//      words it sets: peq_clear_kernel, or a memset past 4096 columns), and
//      per symbol a 64-bit summary of the words where it occurs at all
//      (bit w / group, group = ceil(words / 64)). The DP reads the small,
//      L2-resident summary first and loads a Peq word only where the symbol
//      occurs: with large vocabularies most match words are zero, and each
//      Peq load is a scattered 32-byte sector for 8 useful bytes.
//   2. dp_kernel: one warp per pair; lane l owns q = ceil(words/32) consecutive
//      words of the column and runs row t = s - l + 1 at step s, so the
//      horizontal carry of row t reaches lane l+1 through one shuffle per
//      step (a software pipeline of n + 31 steps). Each row's (VP, VN) words
//      go to global scratch: 16 bytes per word per row, written once.
//      Traffic per pair ~ n * words * 16 bytes written, plus one summary
//      read per row and lane, plus the Peq words that are non-zero.
//   3. rows_kernel: one thread per (pair, row): word start values by
//      popcount prefix sums (stored for the traceback), c_t / first / last by
//      an exact 4-bit-chunk scan of only the words whose lower bound
//      start - popcount(VN) can reach the minimum, then the targets.
//   4. traceback_kernel: one warp per pair; the lanes prefetch the next 32
//      diagonal steps' cells in parallel (see the kernel).
#include <cuda_runtime.h>

#include <cstdint>

#include "align.h"
#include "align_bits.h"

namespace {

constexpr int kWarp = 32;
constexpr int kDpWarpsPerBlock = 4;
constexpr int kThreads = 128;
constexpr int kEosSym = -2;  // y_m: distinct from every symbol (>= 0) and from "absent" (-1)

__device__ __forceinline__ int clamp_len(int64_t v, int64_t width) {
  return static_cast<int>(v < 0 ? 0 : (v > width ? width : v));
}

__device__ __forceinline__ uint64_t low_mask(int bits) {
  return bits >= 64 ? ~0ull : ((1ull << bits) - 1ull);
}

// ---------------------------------------------------------------------------
// 1. Peq

__global__ void peq_kernel(const int32_t* __restrict__ ref_sym, const int64_t* __restrict__ ref_lens,
                           int64_t batch, int64_t ref_width, int64_t words, uint64_t* __restrict__ occ,
                           uint64_t* __restrict__ peq) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= batch * ref_width) return;
  const int64_t b = idx / ref_width;
  const int j = static_cast<int>(idx - b * ref_width);
  if (j >= clamp_len(ref_lens[b], ref_width)) return;
  const int64_t sym = ref_sym[idx];
  const int64_t group = (words + 63) / 64;
  atomicOr(reinterpret_cast<unsigned long long*>(&peq[(b * ref_width + sym) * words + (j >> 6)]),
           1ull << (j & 63));
  atomicOr(reinterpret_cast<unsigned long long*>(&occ[b * ref_width + sym]), 1ull << ((j >> 6) / group));
}

// Clears exactly the Peq words and summaries that peq_kernel will set (for
// words <= 64, where a summary bit is one word): the DP reads no other, so
// the scratch needs no memset of its whole batch * ref_width * words.
__global__ void peq_clear_kernel(const int32_t* __restrict__ ref_sym, const int64_t* __restrict__ ref_lens,
                                 int64_t batch, int64_t ref_width, int64_t words, uint64_t* __restrict__ occ,
                                 uint64_t* __restrict__ peq) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= batch * ref_width) return;
  const int64_t b = idx / ref_width;
  const int j = static_cast<int>(idx - b * ref_width);
  if (j >= clamp_len(ref_lens[b], ref_width)) return;
  const int64_t sym = ref_sym[idx];
  peq[(b * ref_width + sym) * words + (j >> 6)] = 0ull;
  occ[b * ref_width + sym] = 0ull;
}

// ---------------------------------------------------------------------------
// 2. DP, one warp per pair. Q > 0: each lane keeps its (at most Q) words in
// registers; Q == 0: any width, the lane re-reads its previous row from the
// scratch it wrote one step earlier.

template <int Q>
__global__ void __launch_bounds__(kDpWarpsPerBlock * kWarp)
dp_kernel(const int32_t* __restrict__ gen_sym, const int64_t* __restrict__ gen_lens,
          const int64_t* __restrict__ ref_lens, int64_t batch, int64_t gen_width, int64_t ref_width,
          int64_t words, const uint64_t* __restrict__ occ, const uint64_t* __restrict__ peq,
          ulonglong2* __restrict__ bits) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t b = blockIdx.x * static_cast<int64_t>(kDpWarpsPerBlock) + (threadIdx.x / kWarp);
  if (b >= batch) return;  // the whole warp leaves together
  const int n = clamp_len(gen_lens[b], gen_width);
  const int m = clamp_len(ref_lens[b], ref_width);
  if (n == 0 || m == 0) return;
  const int pair_words = (m + 63) >> 6;
  const int q = (pair_words + kWarp - 1) / kWarp;
  const int w0 = lane * q;
  const int own = max(0, min(q, pair_words - w0));  // words owned by this lane
  const int32_t* gs = gen_sym + b * gen_width;
  const uint64_t* pq = peq + b * ref_width * words;
  const uint64_t* pocc = occ + b * ref_width;
  const int group = static_cast<int>((words + 63) / 64);
  ulonglong2* out = bits + b * gen_width * words;

  uint64_t vp[Q > 0 ? Q : 1], vn[Q > 0 ? Q : 1];
#pragma unroll
  for (int i = 0; i < (Q > 0 ? Q : 1); ++i) {
    vp[i] = ~0ull;  // row 0: D[0][j] = j
    vn[i] = 0ull;
  }
  int hout = 0;
  for (int s = 0; s < n + kWarp - 1; ++s) {
    int hin = __shfl_up_sync(0xffffffffu, hout, 1);
    if (lane == 0) hin = 1;  // global boundary: D[t][0] - D[t-1][0] = 1
    const int t = s - lane + 1;
    if (t >= 1 && t <= n && own > 0) {
      const int sym = gs[t - 1];
      const uint64_t* eq = pq + static_cast<int64_t>(sym < 0 ? 0 : sym) * words + w0;
      const uint64_t where = sym < 0 ? 0ull : pocc[sym];  // groups of words holding sym
      ulonglong2* row = out + static_cast<int64_t>(t - 1) * words + w0;
      if constexpr (Q > 0) {
#pragma unroll
        for (int i = 0; i < Q; ++i) {
          if (i < own) {
            const uint64_t e = ((where >> ((w0 + i) / group)) & 1ull) ? eq[i] : 0ull;
            hin = gapfix::advance_word(vp[i], vn[i], e, hin);
            row[i] = make_ulonglong2(vp[i], vn[i]);
          }
        }
      } else {
        const ulonglong2* prev = row - words;
        for (int i = 0; i < own; ++i) {
          uint64_t p = ~0ull, v = 0ull;
          if (t > 1) {
            const ulonglong2 x = prev[i];
            p = x.x;
            v = x.y;
          }
          const uint64_t e = ((where >> ((w0 + i) / group)) & 1ull) ? eq[i] : 0ull;
          hin = gapfix::advance_word(p, v, e, hin);
          row[i] = make_ulonglong2(p, v);
        }
      }
    }
    hout = hin;
  }
}

// ---------------------------------------------------------------------------
// 3. Row outputs, one thread per (pair, row).

// 4-bit chunk of (VP, VN): total, min prefix sum over its 4 positions, first
// and last position (0..3) reaching it; packed (sum+8, min+8, first, last).
__device__ uint32_t nibble_stat(int vp, int vn) {
  const gapfix::ChunkStats c = gapfix::chunk_stats(vp, vn, 4);
  return static_cast<uint32_t>(c.sum + 8) | (static_cast<uint32_t>(c.min_prefix + 8) << 8) |
         (static_cast<uint32_t>(c.first) << 16) | (static_cast<uint32_t>(c.last) << 24);
}

__global__ void __launch_bounds__(kThreads)
rows_kernel(const int32_t* __restrict__ ref_sym, const int64_t* __restrict__ gen_lens,
            const int64_t* __restrict__ ref_lens, int64_t batch, int64_t gen_width, int64_t ref_width,
            int64_t words, int64_t max_targets, const ulonglong2* __restrict__ bits,
            int32_t* __restrict__ starts, int32_t* __restrict__ distance, int32_t* __restrict__ path,
            int32_t* __restrict__ cost, int32_t* __restrict__ first_out, int32_t* __restrict__ last_out,
            int32_t* __restrict__ targets) {
  __shared__ uint32_t table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = nibble_stat(i >> 4, i & 15);
  __syncthreads();

  const int64_t rows = gen_width + 1;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= batch * rows) return;
  const int64_t b = idx / rows;
  const int t = static_cast<int>(idx - b * rows);
  const int n = clamp_len(gen_lens[b], gen_width);
  const int m = clamp_len(ref_lens[b], ref_width);
  if (t > n) return;
  int32_t* trow = max_targets > 0 ? targets + idx * max_targets : nullptr;
  const int32_t* ys = ref_sym + b * ref_width;

  if (t == 0) path[idx] = 0;
  if (t == 0 || m == 0) {  // row 0 (D[0][j] = j) or an empty reference (D[t][0] = t)
    cost[idx] = t;
    first_out[idx] = last_out[idx] = 0;
    if (trow) trow[0] = 0;
    if (t == n) distance[b] = m == 0 ? n : m;  // D[n][0] = n; D[0][m] = m
    return;
  }
  const int pair_words = (m + 63) >> 6;
  const ulonglong2* row = bits + (b * gen_width + (t - 1)) * words;
  int32_t* srow = starts + (b * gen_width + (t - 1)) * words;

  // Pass 1: start value of every word (kept for the traceback), D[t][m], and
  // an upper bound on the row minimum (the word end values).
  int s = t, upper = t;
  for (int w = 0; w < pair_words; ++w) {
    const ulonglong2 x = row[w];
    const uint64_t mask = low_mask(m - 64 * w);
    srow[w] = s;
    s += __popcll(x.x & mask) - __popcll(x.y & mask);
    upper = min(upper, s);
  }
  if (t == n) distance[b] = s;

  // Pass 2: exact minimum over the words whose lower bound can reach it.
  int best = t, first = 0, last = 0;
  s = t;
  for (int w = 0; w < pair_words; ++w) {
    const ulonglong2 x = row[w];
    const uint64_t mask = low_mask(m - 64 * w);
    const int pn = __popcll(x.y & mask);
    if (s - pn <= min(best, upper)) {
      // Bits past m count as +1 steps, so they never reach the minimum.
      const uint64_t wp = (x.x & mask) | ~mask, wn = x.y & mask;
      int v = s;
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        const uint32_t e = table[(((wp >> (4 * c)) & 15) << 4) | ((wn >> (4 * c)) & 15)];
        const int cand = v + static_cast<int>((e >> 8) & 255) - 8;
        const int at = 64 * w + 4 * c + 1;
        if (cand < best) {
          best = cand;
          first = at + static_cast<int>((e >> 16) & 255);
          last = at + static_cast<int>(e >> 24);
        } else if (cand == best) {
          last = at + static_cast<int>(e >> 24);
        }
        v += static_cast<int>(e & 255) - 8;
      }
    }
    s += __popcll(x.x & mask) - pn;
  }
  cost[idx] = best;
  first_out[idx] = first;
  last_out[idx] = last;

  // Pass 3: the first j of each distinct token of {y_j : D[t][j] = c_t}.
  if (trow) {
    int count = 0;
    auto emit = [&](int j) {
      const int sym = j == m ? kEosSym : ys[j];
      for (int i = 0; i < count; ++i) {
        const int k = trow[i];
        if ((k == m ? kEosSym : ys[k]) == sym) return;
      }
      trow[count++] = j;
    };
    if (t == best) emit(0);
    s = t;
    for (int w = 0; w < pair_words && count < max_targets; ++w) {
      const ulonglong2 x = row[w];
      const uint64_t mask = low_mask(m - 64 * w);
      const int pn = __popcll(x.y & mask);
      if (s - pn <= best) {
        const uint64_t wp = (x.x & mask) | ~mask, wn = x.y & mask;
        int v = s;
        for (int c = 0; c < 16 && count < max_targets; ++c) {
          const int bp = static_cast<int>((wp >> (4 * c)) & 15), bn = static_cast<int>((wn >> (4 * c)) & 15);
          const uint32_t e = table[(bp << 4) | bn];
          if (v + static_cast<int>((e >> 8) & 255) - 8 == best) {
            int x2 = v;
            for (int p = 0; p < 4 && count < max_targets; ++p) {
              x2 += ((bp >> p) & 1) - ((bn >> p) & 1);
              if (x2 == best) emit(64 * w + 4 * c + p + 1);
            }
          }
          v += static_cast<int>(e & 255) - 8;
        }
      }
      s += __popcll(x.x & mask) - pn;
    }
  }
}

// ---------------------------------------------------------------------------
// 4. Canonical traceback (diagonal, else up, else left), one warp per pair.
// A thread walking alone would wait one memory latency per step. Instead the
// 32 lanes fetch, in parallel, what the next 32 steps need if the path stays
// diagonal: lane l reads D[t-l-1][j-l-1], D[t-l-1][j-l] and the match flag of
// cell (t-l, j-l). The walk then advances through the lanes with shuffles (all
// lanes take the same decisions) until a step is not diagonal; that step (up,
// with lane l's D[t-1][j], or left, with one bit of row t) is taken directly
// and the window is refilled from the new cell. Long diagonal runs, the common
// case, cost one latency per 32 steps.

constexpr int kTracebackWarpsPerBlock = 4;

__global__ void __launch_bounds__(kTracebackWarpsPerBlock * kWarp)
traceback_kernel(const int32_t* __restrict__ gen_sym, const int32_t* __restrict__ ref_sym,
                 const int64_t* __restrict__ gen_lens, const int64_t* __restrict__ ref_lens,
                 int64_t batch, int64_t gen_width, int64_t ref_width, int64_t words,
                 const ulonglong2* __restrict__ bits, const int32_t* __restrict__ starts,
                 const int32_t* __restrict__ distance, int32_t* __restrict__ path) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t b = blockIdx.x * static_cast<int64_t>(kTracebackWarpsPerBlock) + (threadIdx.x / kWarp);
  if (b >= batch) return;  // the whole warp leaves together
  const int n = clamp_len(gen_lens[b], gen_width);
  const int m = clamp_len(ref_lens[b], ref_width);
  const int32_t* gs = gen_sym + b * gen_width;
  const int32_t* ys = ref_sym + b * ref_width;
  const ulonglong2* pbits = bits + b * gen_width * words;
  const int32_t* pstarts = starts + b * gen_width * words;
  int32_t* prow = path + b * (gen_width + 1);
  constexpr int kNever = 1 << 29;  // a value no cell reaches

  // D[r][x] from the stored row r >= 1 (row 0: x; column 0: r).
  auto value = [&](int r, int x) -> int {
    if (r == 0) return x;
    if (x == 0) return r;
    const int w = (x - 1) >> 6;
    const int64_t at = static_cast<int64_t>(r - 1) * words + w;
    const ulonglong2 v = pbits[at];
    const uint64_t mask = low_mask(x - 64 * w);
    return pstarts[at] + __popcll(v.x & mask) - __popcll(v.y & mask);
  };

  int t = n, j = m, d = distance[b];
  while (t > 0) {
    // Window: lane l holds the data of cell (t - l, j - l).
    const int tl = t - lane, jl = j - lane;
    int diag_value = kNever, up_value = kNever, mismatch = 1;
    if (tl >= 1 && jl >= 0) {
      up_value = value(tl - 1, jl);
      if (jl >= 1) {
        diag_value = value(tl - 1, jl - 1);
        const int sym = gs[tl - 1];
        mismatch = (sym >= 0 && sym == ys[jl - 1]) ? 0 : 1;
      }
    }
    int l = 0;
    for (; l < kWarp; ++l) {
      const int vd = __shfl_sync(0xffffffffu, diag_value, l);
      const int c = __shfl_sync(0xffffffffu, mismatch, l);
      if (t == 0 || j == 0 || vd + c != d) break;
      if (lane == 0) prow[t] = j;  // diagonal: match or substitution
      --t;
      --j;
      d -= c;
    }
    if (t == 0 || l == kWarp) continue;  // done, or a full window of diagonal steps
    const int vu = __shfl_sync(0xffffffffu, up_value, l);
    if (vu + 1 == d) {  // up: g_{t-1} is an extra token
      if (lane == 0) prow[t] = j;
      --t;
      d -= 1;
    } else {  // left: y_{j-1} is missing; D[t][j-1] = D[t][j] - (bit j-1 of row t)
      const ulonglong2 v = pbits[static_cast<int64_t>(t - 1) * words + ((j - 1) >> 6)];
      const uint64_t bit = 1ull << ((j - 1) & 63);
      d -= (v.x & bit) ? 1 : ((v.y & bit) ? -1 : 0);
      --j;
    }
  }
  if (lane == 0) prow[0] = 0;
}

template <int Q>
void launch_dp(const int32_t* gen_sym, const int64_t* gen_lens, const int64_t* ref_lens, int64_t batch,
               int64_t gen_width, int64_t ref_width, int64_t words, const uint64_t* occ,
               const uint64_t* peq, ulonglong2* bits, cudaStream_t stream) {
  const int64_t blocks = (batch + kDpWarpsPerBlock - 1) / kDpWarpsPerBlock;
  dp_kernel<Q><<<static_cast<unsigned>(blocks), kDpWarpsPerBlock * kWarp, 0, stream>>>(
      gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits);
}

}  // namespace

extern "C" int gapfix_align_cuda_launch(const int32_t* gen_sym, const int32_t* ref_sym,
                                        const int64_t* gen_lens, const int64_t* ref_lens,
                                        int64_t batch, int64_t gen_width, int64_t ref_width,
                                        int64_t max_targets, uint64_t* peq_scratch,
                                        uint64_t* bits_scratch, int32_t* starts_scratch,
                                        int32_t* distance, int32_t* path, int32_t* cost,
                                        int32_t* first, int32_t* last, int32_t* targets,
                                        void* stream_ptr) {
  if (batch <= 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t words = (ref_width + 63) / 64;
  ulonglong2* bits = reinterpret_cast<ulonglong2*>(bits_scratch);
  cudaError_t err;
  if (words > 0 && gen_width > 0) {
    uint64_t* occ = peq_scratch;                   // batch * ref_width summaries
    uint64_t* peq = peq_scratch + batch * ref_width;  // batch * ref_width * words
    const int64_t peq_blocks = (batch * ref_width + kThreads - 1) / kThreads;
    if (words <= 64) {
      peq_clear_kernel<<<static_cast<unsigned>(peq_blocks), kThreads, 0, stream>>>(ref_sym, ref_lens, batch,
                                                                                 ref_width, words, occ, peq);
    } else {  // a summary bit covers several words, which must all read as zero
      err = cudaMemsetAsync(peq_scratch, 0, sizeof(uint64_t) * batch * ref_width * (words + 1), stream);
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    peq_kernel<<<static_cast<unsigned>(peq_blocks), kThreads, 0, stream>>>(ref_sym, ref_lens, batch, ref_width,
                                                                           words, occ, peq);
    const int64_t per_lane = (words + kWarp - 1) / kWarp;
    if (per_lane <= 1) {
      launch_dp<1>(gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits, stream);
    } else if (per_lane <= 2) {
      launch_dp<2>(gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits, stream);
    } else if (per_lane <= 4) {
      launch_dp<4>(gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits, stream);
    } else if (per_lane <= 8) {
      launch_dp<8>(gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits, stream);
    } else {
      launch_dp<0>(gen_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, occ, peq, bits, stream);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t row_blocks = (batch * (gen_width + 1) + kThreads - 1) / kThreads;
  rows_kernel<<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(
      ref_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, max_targets, bits,
      starts_scratch, distance, path, cost, first, last, targets);
  const int64_t pair_blocks = (batch + kTracebackWarpsPerBlock - 1) / kTracebackWarpsPerBlock;
  traceback_kernel<<<static_cast<unsigned>(pair_blocks), kTracebackWarpsPerBlock * kWarp, 0, stream>>>(
      gen_sym, ref_sym, gen_lens, ref_lens, batch, gen_width, ref_width, words, bits,
      starts_scratch, distance, path);
  err = cudaGetLastError();
  return static_cast<int>(err);
}
