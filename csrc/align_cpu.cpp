// CPU kernel of the batched prefix alignment (see align.h for the outputs).
//
// Bit-parallel Levenshtein (Myers 1999, Hyyro's block form): the reference is
// the pattern, laid along a column of ceil(m/64) words, and the generated
// tokens are the text, scanned row by row t = 1..n. Row t of the DP matrix is
// kept as two bit-vectors, bit j-1 of VP (VN) set when
// D[t][j] - D[t][j-1] = +1 (-1); the global boundary D[t][0] = t enters as a
// horizontal +1 into the first word of every row.
//
// Banding (Ukkonen). Any path of cost <= k stays within |t - j| <= k, so cells
// of true value <= k depend only on band cells. We compute, per row, only the
// words that cover the band; cells just outside the computed words are taken as
// "+1 per step" from a computed neighbour, which over-estimates them
// (D[t][j] <= D[t-1][j] + 1 and D[t][j] <= D[t][j-1] + 1), and the min-plus
// recurrence keeps over-estimates over-estimates. Hence computed values are
// >= the true ones everywhere and exact on every cell of true value <= k. If the
// computed D[n][m] <= k it is therefore exact, and so is everything we read:
// every cell on an optimal path has value <= D[n][m] <= k; the row minimum
// c_t <= D[n][m] (an optimal path crosses row t), so the argmin set J_t is
// exact; and in the traceback an optimal predecessor (value < D[t][j] <= k) is
// exact while a non-optimal one, over-estimated, stays non-optimal. The first
// k is 1.5x the bag distance (a lower bound on D, and close to it for large
// vocabularies; see align_pair); should the full pass come out with
// D[n][m] > k, distance-only passes double k until D[n][m] <= k and the full
// pass reruns. k >= max(n, m), or a band covering most words, is the full
// matrix.
//
// Memory: the traceback reads the stored VP/VN words of each row (16 bytes per
// word per row, band width only); no integer matrix is ever formed. Work per
// pair: O(n * band_words) word steps, plus O(band_words) per row for the row
// minima (popcount bounds computed with the step skip the words that cannot
// hold the minimum; the few others are scanned 8 bits at a time through a
// 64K-entry table), plus O(n + m) traceback steps with an O(band_words)
// prefix per row change.
#include "align.h"
#include "align_bits.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gapfix {
namespace {

constexpr int kInf = 1 << 29;

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

// Per 8-bit chunk of (VP, VN): total delta, the minimum over its 8 prefix sums,
// and the first / last position (0..7) reaching that minimum.
struct ChunkStat {
  int8_t sum;
  int8_t min_prefix;
  uint8_t first;
  uint8_t last;
};

const ChunkStat* chunk_table() {
  static const std::vector<ChunkStat> table = [] {
    std::vector<ChunkStat> t(1 << 16);
    for (int vp = 0; vp < 256; ++vp) {
      for (int vn = 0; vn < 256; ++vn) {
        const ChunkStats c = chunk_stats(vp, vn, 8);
        t[(vp << 8) | vn] = ChunkStat{static_cast<int8_t>(c.sum), static_cast<int8_t>(c.min_prefix),
                                      static_cast<uint8_t>(c.first), static_cast<uint8_t>(c.last)};
      }
    }
    return t;
  }();
  return table.data();
}

// Words [lo, hi] of row t cover the band |t - j| <= k (see the file comment).
struct Band {
  int64_t k;
  int m;
  int words;
  int lo(int t) const {
    const int64_t x = t - k - 64;
    return x > 0 ? static_cast<int>((x + 63) / 64) : 0;
  }
  int hi(int t) const {
    const int64_t top = std::min<int64_t>(m, t + k);
    return top >= 1 ? std::min<int>(words - 1, static_cast<int>((top - 1) / 64)) : 0;
  }
  // An upper bound on hi(t) - lo(t) + 1 over all t.
  int max_width() const {
    const int64_t w = (2 * k + 63) / 64 + 2;
    return static_cast<int>(std::min<int64_t>(words, w));
  }
};

struct HashSlot {
  int64_t key;
  int32_t sym;  // -1: empty
};

struct Workspace {
  std::vector<HashSlot> hash;
  std::vector<int32_t> ysym, gsym;
  std::vector<uint64_t> peq, cur_vp, cur_vn, rows_vp, rows_vn;
  std::vector<int32_t> row_lo, row_hi, row_base;
  std::vector<int32_t> word_start, word_lb, prev_start;
  std::vector<int32_t> found, counts;
};

struct PairOut {
  int32_t* path;
  int32_t* cost;
  int32_t* first;
  int32_t* last;
  int32_t* targets;  // (n+1, K) rows of this pair, or nullptr
  int K;
};

class PairAligner {
 public:
  PairAligner(Workspace& ws, int n, int m)
      : ws_(ws), n_(n), m_(m), words_((m + 63) / 64),
        tail_mask_(m % 64 == 0 ? ~uint64_t{0} : (uint64_t{1} << (m % 64)) - 1) {}

  template <typename Id>
  void remap(const Id* g, const Id* y) {
    // Dense symbols: the reference's distinct ids -> 0..u-1 in order of first
    // occurrence; a generated id absent from the reference -> -1 (matches nothing).
    int bits = 1;
    while ((1 << bits) < 2 * std::max(m_, 1)) ++bits;
    const uint64_t cap = uint64_t{1} << bits;
    ws_.hash.assign(cap, HashSlot{0, -1});
    ws_.ysym.resize(m_ + 1);
    ws_.gsym.resize(std::max(n_, 1));
    HashSlot* table = ws_.hash.data();
    auto slot_of = [&](int64_t key) -> HashSlot& {
      uint64_t h = (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
      while (table[h].sym >= 0 && table[h].key != key) h = (h + 1) & (cap - 1);
      return table[h];
    };
    // Symbols, with how often each occurs in y (for the bag distance below).
    ws_.counts.resize(std::max(m_, 1));
    int u = 0;
    for (int j = 0; j < m_; ++j) {
      const int64_t key = static_cast<int64_t>(y[j]);
      HashSlot& slot = slot_of(key);
      if (slot.sym < 0) {
        slot = HashSlot{key, u};
        ws_.counts[u++] = 0;
      }
      ws_.ysym[j] = slot.sym;
      ++ws_.counts[slot.sym];
    }
    eos_ = u;
    ws_.ysym[m_] = eos_;  // y_m: the virtual EOS, distinct from every id
    // Bag distance max(n, m) - |g and y as multisets|: a lower bound on
    // D[n][m] (one edit changes each multiset by at most one token), and close
    // to it for large vocabularies; it picks the first band.
    int common = 0;
    for (int t = 0; t < n_; ++t) {
      const int sym = slot_of(static_cast<int64_t>(g[t])).sym;
      ws_.gsym[t] = sym;
      if (sym >= 0 && ws_.counts[sym] > 0) {
        --ws_.counts[sym];
        ++common;
      }
    }
    bag_distance_ = std::max(n_, m_) - common;
    // Peq: match bit-vectors, one row of `words_` words per reference symbol.
    ws_.peq.assign(static_cast<size_t>(u + 1) * words_, 0);  // row u: matches nothing
    for (int j = 0; j < m_; ++j)
      ws_.peq[static_cast<size_t>(ws_.ysym[j]) * words_ + (j >> 6)] |= uint64_t{1} << (j & 63);
  }

  int bag_distance() const { return bag_distance_; }
  int words() const { return words_; }

  // D[n][m] computed within the band of half-width k (exact when <= k).
  int banded_distance(int64_t k) { return sweep<false>(k, nullptr); }

  // The full pass: DP rows stored for the traceback, row minima, targets.
  int full_pass(int64_t k, const PairOut& out) { return sweep<true>(k, &out); }

  // Canonical traceback from (n, m); needs full_pass to have run.
  void traceback(int distance, int32_t* path) {
    int t = n_, j = m_, d = distance;
    if (t > 0) load_prev_row(t - 1);
    while (t > 0) {
      if (j > 0) {
        const int c = (ws_.gsym[t - 1] >= 0 && ws_.gsym[t - 1] == ws_.ysym[j - 1]) ? 0 : 1;
        if (prev_value(j - 1) + c == d) {  // diagonal: match or substitution
          path[t] = j;
          --t;
          --j;
          d -= c;
          if (t > 0) load_prev_row(t - 1);
          continue;
        }
      }
      if (prev_value(j) + 1 == d) {  // up: g_{t-1} is an extra token
        path[t] = j;
        --t;
        d -= 1;
        if (t > 0) load_prev_row(t - 1);
        continue;
      }
      d -= delta(t, j);  // left: y_{j-1} is missing
      --j;
    }
    path[0] = 0;
  }

 private:

  // One row-by-row sweep over the band of half-width k; returns D[n][m]. The
  // full sweep also stores each row's words and computes the row outputs.
  template <bool kFull>
  int sweep(int64_t k, const PairOut* out) {
    const Band band{k, m_, words_};
    const int stride = kFull ? band.max_width() : 0;
    ws_.cur_vp.assign(words_, ~uint64_t{0});  // row 0: D[0][j] = j
    ws_.cur_vn.assign(words_, 0);
    uint64_t* vp = ws_.cur_vp.data();
    uint64_t* vn = ws_.cur_vn.data();
    if constexpr (kFull) {
      stride_ = stride;
      ws_.rows_vp.resize(static_cast<size_t>(n_ + 1) * stride);
      ws_.rows_vn.resize(static_cast<size_t>(n_ + 1) * stride);
      ws_.row_lo.resize(n_ + 1);
      ws_.row_hi.resize(n_ + 1);
      ws_.row_base.resize(n_ + 1);
      ws_.word_start.resize(words_ + 1);
      ws_.word_lb.resize(words_ + 1);
      ws_.found.resize(std::max(out->K, 1));
      // Row 0: c_0 = 0 and J_0 = {0}.
      out->cost[0] = 0;
      out->first[0] = out->last[0] = 0;
      if (out->targets) out->targets[0] = 0;
    }
    // base = D[t][64 * lo(t)], the value entering the first computed word. A
    // dropped top word's bottom value is read before it goes stale; either
    // way the first word takes a horizontal +1 (exact for lo = 0: D[t][0] = t).
    int base = 0, lo_prev = 0, prev_cost = 0;
    for (int t = 1; t <= n_; ++t) {
      const int lo = band.lo(t), hi = band.hi(t);
      if (lo > lo_prev) base += popcount64(vp[lo_prev]) - popcount64(vn[lo_prev]);
      base += 1;
      const uint64_t* eq = eq_row(t);
      int hin = 1;
      if constexpr (kFull) {
        uint64_t* svp = &ws_.rows_vp[static_cast<size_t>(t) * stride];
        uint64_t* svn = &ws_.rows_vn[static_cast<size_t>(t) * stride];
        // With the step, pass 1 of the row minimum: each word's start value
        // and lower bound start - popcount(VN); the word ends bound the
        // minimum from above. Only the last word has bits past m.
        int* start = ws_.word_start.data();
        int* lb = ws_.word_lb.data();
        int value = base, upper = base;
        for (int w = lo; w <= hi; ++w) {
          hin = advance_word(vp[w], vn[w], eq[w], hin);
          svp[w - lo] = vp[w];
          svn[w - lo] = vn[w];
          const uint64_t mask = valid_mask(w);
          const int pn = popcount64(vn[w] & mask);
          start[w] = value;
          lb[w] = value - pn;
          value += popcount64(vp[w] & mask) - pn;
          upper = std::min(upper, value);
        }
        ws_.row_lo[t] = lo;
        ws_.row_hi[t] = hi;
        ws_.row_base[t] = base;
        prev_cost = row_minimum(t, lo, hi, base, upper, prev_cost, vp, vn, *out);
      } else {
        for (int w = lo; w <= hi; ++w) hin = advance_word(vp[w], vn[w], eq[w], hin);
      }
      lo_prev = lo;
    }
    int d = base;  // hi(n) = words - 1: the last row reaches j = m
    for (int w = lo_prev; w < words_; ++w) {
      const uint64_t mask = valid_mask(w);
      d += popcount64(vp[w] & mask) - popcount64(vn[w] & mask);
    }
    return d;
  }

  const uint64_t* eq_row(int t) const {
    const int s = ws_.gsym[t - 1];
    return &ws_.peq[static_cast<size_t>(s >= 0 ? s : eos_) * words_];
  }

  uint64_t valid_mask(int w) const { return w == words_ - 1 ? tail_mask_ : ~uint64_t{0}; }

  // Exact minimum of one word's values (start value v at bit 0), 8 bits at a
  // time; updates (best, first, last) with ties extending `last`.
  void scan_word(int w, uint64_t vp, uint64_t vn, int v, int& best, int& first, int& last) const {
    const uint64_t mask = valid_mask(w);
    // Bits past m count as +1 steps: they then never reach the minimum.
    const uint64_t wp = (vp & mask) | ~mask, wn = vn & mask;
    const ChunkStat* table = chunk_table();
    for (int c = 0; c < 8; ++c) {
      const ChunkStat e = table[(((wp >> (8 * c)) & 255) << 8) | ((wn >> (8 * c)) & 255)];
      const int cand = v + e.min_prefix;
      if (cand < best) {
        best = cand;
        first = 64 * w + 8 * c + e.first + 1;
        last = 64 * w + 8 * c + e.last + 1;
      } else if (cand == best) {
        last = 64 * w + 8 * c + e.last + 1;
      }
      v += e.sum;
    }
  }

  // Row minimum of row t over the computed words, given pass 1 (word starts,
  // lower bounds, the upper bound `upper`). Words are scanned exactly only
  // where their bound can reach the minimum, ascending; since c_t is c_{t-1}
  // or c_{t-1} + 1, reaching c_{t-1} settles c_t and `first`, and `last` is
  // then found scanning candidates down from the right. Returns c_t.
  int row_minimum(int t, int lo, int hi, int base, int upper, int prev_cost, const uint64_t* vp,
                  const uint64_t* vn, const PairOut& out) {
    const int* start = ws_.word_start.data();
    const int* lb = ws_.word_lb.data();
    int best = base, first = 64 * lo, last = 64 * lo;
    int w = lo;
    for (; w <= hi && best > prev_cost; ++w) {
      if (lb[w] <= std::min(best, upper)) scan_word(w, vp[w], vn[w], start[w], best, first, last);
    }
    if (w <= hi) {  // settled early: the last argmin lies in words w..hi, if not before
      for (int x = hi; x >= w; --x) {
        if (lb[x] > best) continue;
        int word_best = best + 1, word_first = 0, word_last = 0;
        scan_word(x, vp[x], vn[x], start[x], word_best, word_first, word_last);
        if (word_best == best) {
          last = word_last;
          break;
        }
      }
    }
    out.cost[t] = best;
    out.first[t] = first;
    out.last[t] = last;
    if (out.targets) row_targets(t, lo, hi, base, best, vp, vn, out);
    return best;
  }

  // First j (ascending) of each distinct token among {y_j : D[t][j] = c}.
  void row_targets(int t, int lo, int hi, int base, int c, const uint64_t* vp, const uint64_t* vn,
                   const PairOut& out) {
    const int K = out.K;
    int32_t* row = out.targets + static_cast<size_t>(t) * K;
    int* found = ws_.found.data();
    int count = 0;
    auto emit = [&](int j) {
      const int sym = ws_.ysym[j];  // ysym[m] is the virtual EOS
      for (int i = 0; i < count; ++i)
        if (found[i] == sym) return;
      found[count] = sym;
      row[count++] = j;
    };
    if (base == c) emit(64 * lo);
    const ChunkStat* table = chunk_table();
    for (int w = lo; w <= hi && count < K; ++w) {
      if (ws_.word_lb[w] > c) continue;
      const uint64_t mask = valid_mask(w);
      const uint64_t wp = (vp[w] & mask) | ~mask, wn = vn[w] & mask;
      int v = ws_.word_start[w];
      for (int ch = 0; ch < 8 && count < K; ++ch) {
        const uint64_t bp = (wp >> (8 * ch)) & 255, bn = (wn >> (8 * ch)) & 255;
        const ChunkStat e = table[(bp << 8) | bn];
        if (v + e.min_prefix == c) {
          int x = v;
          for (int p = 0; p < 8 && count < K; ++p) {
            x += static_cast<int>((bp >> p) & 1) - static_cast<int>((bn >> p) & 1);
            if (x == c) emit(64 * w + 8 * ch + p + 1);
          }
        }
        v += e.sum;
      }
    }
  }

  // Traceback helpers: values of row r = t - 1 (r = 0 is D[0][x] = x).
  void load_prev_row(int r) {
    prev_row_ = r;
    if (r == 0) return;
    const int lo = ws_.row_lo[r], hi = ws_.row_hi[r];
    const uint64_t* vp = &ws_.rows_vp[static_cast<size_t>(r) * stride_];
    const uint64_t* vn = &ws_.rows_vn[static_cast<size_t>(r) * stride_];
    ws_.prev_start.resize(stride_ + 1);
    int s = ws_.row_base[r];
    for (int w = lo; w <= hi; ++w) {
      ws_.prev_start[w - lo] = s;
      s += popcount64(vp[w - lo]) - popcount64(vn[w - lo]);  // bits past m are never read
    }
  }

  int prev_value(int x) const {
    const int r = prev_row_;
    if (r == 0) return x;
    const int lo = ws_.row_lo[r], hi = ws_.row_hi[r];
    const int jmax = std::min(m_, 64 * hi + 64);
    if (x < 64 * lo || x > jmax) return kInf;  // not computed: true value > k
    if (x == 64 * lo) return ws_.row_base[r];
    const int w = (x - 1) >> 6, b = x - 64 * w;
    const uint64_t mask = b >= 64 ? ~uint64_t{0} : ((uint64_t{1} << b) - 1);
    const size_t at = static_cast<size_t>(r) * stride_ + (w - lo);
    return ws_.prev_start[w - lo] + popcount64(ws_.rows_vp[at] & mask) -
           popcount64(ws_.rows_vn[at] & mask);
  }

  // D[t][x] - D[t][x-1] from the stored row t (x in the row's computed range).
  int delta(int t, int x) const {
    const int w = (x - 1) >> 6;
    const size_t at = static_cast<size_t>(t) * stride_ + (w - ws_.row_lo[t]);
    const uint64_t bit = uint64_t{1} << ((x - 1) & 63);
    return (ws_.rows_vp[at] & bit) ? 1 : ((ws_.rows_vn[at] & bit) ? -1 : 0);
  }

  Workspace& ws_;
  const int n_, m_, words_;
  const uint64_t tail_mask_;  // valid bits of the last word
  int eos_ = 0;
  int bag_distance_ = 0;
  int stride_ = 1;
  int prev_row_ = 0;
};

template <typename Id>
void align_pair(const Id* g, const Id* y, int n, int m, Workspace& ws, const PairOut& out,
                int32_t* distance) {
  if (m == 0) {  // D[t][0] = t: every row ends at j = 0 = m (the EOS)
    for (int t = 0; t <= n; ++t) {
      out.path[t] = 0;
      out.cost[t] = t;
      out.first[t] = out.last[t] = 0;
      if (out.targets) out.targets[static_cast<size_t>(t) * out.K] = 0;
    }
    *distance = n;
    return;
  }
  PairAligner aligner(ws, n, m);
  aligner.remap(g, y);
  // First band: D[n][m] >= max(|n - m|, bag distance), and for realistic pairs
  // D is near the bag distance (between 1x for substitutions only and about
  // 1.5x for an even mix with insertions and deletions), so the full pass runs
  // directly on a band of 1.5x the bag distance. Should it come out above k (not exact), cheaper
  // distance-only passes double k until D <= k, and the full pass reruns. A
  // band covering most of the matrix is run as the full matrix.
  const int64_t full_k = std::max(n, m);
  auto near_full = [&](int64_t k) {
    return k >= full_k || 4 * ((2 * k + 63) / 64 + 1) >= 3 * int64_t{aligner.words()};
  };
  const int64_t bag = aligner.bag_distance();
  int64_t k = std::max<int64_t>({std::abs(n - m), bag + bag / 2 + 16, 64});
  if (near_full(k)) k = full_k;
  int d = aligner.full_pass(k, out);
  if (d > k) {
    do {
      k *= 2;
      if (near_full(k)) {
        k = full_k;
        break;
      }
    } while (aligner.banded_distance(k) > k);
    d = aligner.full_pass(k, out);
  }
  aligner.traceback(d, out.path);
  *distance = d;
}

}  // namespace

template <typename Id>
void align_cpu(const Id* gen, const Id* ref, const int64_t* gen_lens, const int64_t* ref_lens,
               int64_t batch, int64_t gen_width, int64_t ref_width, int64_t max_targets,
               const AlignOutputs& out, int num_threads) {
  chunk_table();  // build the table once, outside the parallel region
  const int64_t rows = gen_width + 1;
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
  {
    Workspace ws;
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < batch; ++b) {
      const int n = static_cast<int>(gen_lens[b]);
      const int m = static_cast<int>(ref_lens[b]);
      PairOut po{out.path + b * rows, out.cost + b * rows, out.first + b * rows,
                 out.last + b * rows,
                 max_targets > 0 ? out.targets + b * rows * max_targets : nullptr,
                 static_cast<int>(max_targets)};
      align_pair(gen + b * gen_width, ref + b * ref_width, n, m, ws, po, out.distance + b);
    }
  }
}

template void align_cpu<int32_t>(const int32_t*, const int32_t*, const int64_t*, const int64_t*,
                                 int64_t, int64_t, int64_t, int64_t, const AlignOutputs&, int);
template void align_cpu<int64_t>(const int64_t*, const int64_t*, const int64_t*, const int64_t*,
                                 int64_t, int64_t, int64_t, int64_t, const AlignOutputs&, int);

}  // namespace gapfix
