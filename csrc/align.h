// Batched prefix alignment: plain C++ declarations shared by the CPU kernel,
// the CUDA launcher and their torch bindings (no torch types here).
//
// For every pair b, with generated tokens g = gen[b, :n] and reference tokens
// y = ref[b, :m], D[t][j] is the unit-cost Levenshtein distance between g_<t
// and y_<j. Outputs, each int32 and row-major, rows t = 0..n (t > n left as -1):
//   distance[b]            D[n][m]
//   path[b, t]             j(t): smallest j in row t of the canonical optimal
//                          path traced back from (n, m) to (0, 0), preferring
//                          diagonal, then up (g_{t-1} extra), then left
//                          (y_{j-1} missing)
//   cost[b, t]             c_t = min_j D[t][j]
//   first/last[b, t]       min / max of J_t = {j : D[t][j] = c_t}
//   targets[b, t, k]       (only when max_targets > 0) the first j, in
//                          ascending order, of each distinct token among
//                          {y_j : j in J_t}, with y_m a virtual EOS distinct
//                          from every id; at most max_targets, -1 padded
#pragma once

#include <cstdint>

namespace gapfix {

struct AlignOutputs {
  int32_t* distance;  // (B,)
  int32_t* path;      // (B, gen_width + 1)
  int32_t* cost;      // (B, gen_width + 1)
  int32_t* first;     // (B, gen_width + 1)
  int32_t* last;      // (B, gen_width + 1)
  int32_t* targets;   // (B, gen_width + 1, max_targets), or nullptr when max_targets == 0
};

// CPU kernel (bit-parallel, banded, OpenMP over pairs). Id is int32_t or
// int64_t. Lengths must lie in [0, width]; ids are compared for equality only.
// The outputs must be pre-filled with -1 by the caller; rows 0..n are written.
template <typename Id>
void align_cpu(const Id* gen, const Id* ref, const int64_t* gen_lens, const int64_t* ref_lens,
               int64_t batch, int64_t gen_width, int64_t ref_width, int64_t max_targets,
               const AlignOutputs& out, int num_threads);

}  // namespace gapfix

// CUDA launcher (csrc/cuda/align_cuda.cu), callable without torch headers.
// Inputs are device pointers, row-major. gen_sym/ref_sym are dense per-pair
// symbols: ref_sym[b, j] in [0, ref_width) with equal ids <-> equal symbols,
// gen_sym[b, t] the symbol of the same id in ref[b, :m], or -1 when the id
// does not occur there. With words = ceil(ref_width / 64), the caller provides
// scratch (any contents) of at least
//   peq_scratch     batch * ref_width * (words + 1)  uint64 (match bit-vectors
//                   and per-symbol summaries)
//   bits_scratch    batch * gen_width * words * 2  uint64 (rows' VP/VN)
//   starts_scratch  batch * gen_width * words  int32 (D at each word start)
// and outputs pre-filled with -1. Lengths are clamped to [0, width].
// Returns 0, or the cudaError_t of the first failed launch.
extern "C" int gapfix_align_cuda_launch(const int32_t* gen_sym, const int32_t* ref_sym,
                                        const int64_t* gen_lens, const int64_t* ref_lens,
                                        int64_t batch, int64_t gen_width, int64_t ref_width,
                                        int64_t max_targets, uint64_t* peq_scratch,
                                        uint64_t* bits_scratch, int32_t* starts_scratch,
                                        int32_t* distance, int32_t* path, int32_t* cost,
                                        int32_t* first, int32_t* last, int32_t* targets,
                                        void* stream);
