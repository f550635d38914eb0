// Runs gapfix_align_cuda_launch (csrc/cuda/align_cuda.cu, rewritten for
// tests/cuda_emulation.h) on inputs from a file and writes its outputs.
// Input: int64 batch, gen_width, ref_width, max_targets; int32 gen_sym
// (batch*gen_width), int32 ref_sym (batch*ref_width); int64 gen_lens, ref_lens.
// Output: int32 distance, path, cost, first, last, targets.
#include <cstdio>
#include <vector>

#include "cuda_emulation.h"
#include "align_cuda_emulated.inc"

template <typename T>
static void read(FILE* f, T* p, size_t n) {
  if (n && fread(p, sizeof(T), n, f) != n) throw 1;
}
template <typename T>
static void write(FILE* f, const std::vector<T>& v) {
  fwrite(v.data(), sizeof(T), v.size(), f);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = fopen(argv[1], "rb");
  int64_t head[4];
  read(in, head, 4);
  const int64_t B = head[0], Tg = head[1], Tr = head[2], K = head[3];
  const int64_t words = (Tr + 63) / 64;
  std::vector<int32_t> gen_sym(B * Tg), ref_sym(B * Tr);
  std::vector<int64_t> gen_lens(B), ref_lens(B);
  read(in, gen_sym.data(), gen_sym.size());
  read(in, ref_sym.data(), ref_sym.size());
  read(in, gen_lens.data(), B);
  read(in, ref_lens.data(), B);
  fclose(in);
  // Scratch starts as garbage, as device memory does: no kernel may rely on zeros.
  std::vector<uint64_t> peq(B * Tr * (words + 1) + 1, 0xA5A5A5A5A5A5A5A5ull);
  std::vector<uint64_t> bits(2 * B * Tg * words + 2, 0x5A5A5A5A5A5A5A5Aull);
  std::vector<int32_t> starts(B * Tg * words + 1, 0x5A5A5A5A);
  std::vector<int32_t> distance(B, -1), path(B * (Tg + 1), -1), cost(path), first(path), last(path),
      targets(B * (Tg + 1) * K, -1);
  const int rc = gapfix_align_cuda_launch(gen_sym.data(), ref_sym.data(), gen_lens.data(), ref_lens.data(),
                                          B, Tg, Tr, K, peq.data(), bits.data(), starts.data(),
                                          distance.data(), path.data(), cost.data(), first.data(),
                                          last.data(), K > 0 ? targets.data() : nullptr, nullptr);
  FILE* out = fopen(argv[2], "wb");
  write(out, distance);
  write(out, path);
  write(out, cost);
  write(out, first);
  write(out, last);
  write(out, targets);
  fclose(out);
  return rc;
}
