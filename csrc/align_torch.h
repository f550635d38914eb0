// Torch-side helpers shared by the CPU (align_ops.cpp) and CUDA
// (cuda/align_cuda_binding.cpp) bindings of torch.ops.gapfix.align.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace gapfix {

using AlignResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shapes and dtypes (the Python wrapper raises friendlier errors first; these
// keep a direct call memory-safe). Lengths are checked by each binding.
inline void check_align_args(const at::Tensor& gen, const at::Tensor& ref, const at::Tensor& gen_lens,
                             const at::Tensor& ref_lens, int64_t max_targets) {
  TORCH_CHECK_VALUE(ref.device() == gen.device() && gen_lens.device() == gen.device() &&
                        ref_lens.device() == gen.device(),
                    "gen, ref, gen_lens and ref_lens must be on one device");
  TORCH_CHECK_VALUE(gen.dim() == 2, "gen must be 2-D (batch, width), got ", gen.dim(), " dims");
  TORCH_CHECK_VALUE(ref.dim() == 2, "ref must be 2-D (batch, width), got ", ref.dim(), " dims");
  TORCH_CHECK_VALUE(gen.scalar_type() == ref.scalar_type() &&
                        (gen.scalar_type() == at::kInt || gen.scalar_type() == at::kLong),
                    "gen and ref must both be int32 or both int64");
  TORCH_CHECK_VALUE(max_targets >= 0, "max_targets must be >= 0");
  const int64_t batch = gen.size(0);
  TORCH_CHECK_VALUE(ref.size(0) == batch, "ref batch size ", ref.size(0), " != gen batch size ", batch);
  TORCH_CHECK_VALUE(gen.size(1) < (int64_t{1} << 28) && ref.size(1) < (int64_t{1} << 28),
                    "widths must be < 2^28");
  TORCH_CHECK_VALUE(gen_lens.dim() == 1 && gen_lens.size(0) == batch, "gen_lens must have shape (", batch, ",)");
  TORCH_CHECK_VALUE(ref_lens.dim() == 1 && ref_lens.size(0) == batch, "ref_lens must have shape (", batch, ",)");
  TORCH_CHECK_VALUE(gen_lens.scalar_type() == at::kLong && ref_lens.scalar_type() == at::kLong,
                    "gen_lens and ref_lens must be int64");
}

// distance (B,), path / cost / first / last (B, Tg+1), targets (B, Tg+1, K):
// int32 on gen's device, all -1 (rows past a pair's length stay so).
inline AlignResult make_align_outputs(const at::Tensor& gen, int64_t max_targets) {
  const int64_t batch = gen.size(0), rows = gen.size(1) + 1;
  const auto opts = gen.options().dtype(at::kInt);
  return {at::full({batch}, -1, opts),        at::full({batch, rows}, -1, opts),
          at::full({batch, rows}, -1, opts),  at::full({batch, rows}, -1, opts),
          at::full({batch, rows}, -1, opts),  at::full({batch, rows, max_targets}, -1, opts)};
}

}  // namespace gapfix
