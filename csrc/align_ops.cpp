// torch.ops.gapfix.align: schema and CPU binding of the batched prefix alignment.
// The Python wrapper (gapfix/ops/align.py) validates arguments and casts the
// lengths to int64; the checks here keep a direct call memory-safe.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "align.h"

#define GAPFIX_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define GAPFIX_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define GAPFIX_CHECK_SHAPE(x, ...)                                                   \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" \
                    #__VA_ARGS__ "), got ", (x).sizes())

namespace gapfix {
namespace {

using AlignResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AlignResult align_cpu_op(const at::Tensor& gen, const at::Tensor& ref, const at::Tensor& gen_lens,
                         const at::Tensor& ref_lens, int64_t max_targets) {
  GAPFIX_CHECK_CPU(gen);
  GAPFIX_CHECK_CPU(ref);
  GAPFIX_CHECK_CPU(gen_lens);
  GAPFIX_CHECK_CPU(ref_lens);
  TORCH_CHECK_VALUE(gen.dim() == 2, "gen must be 2-D (batch, width), got ", gen.dim(), " dims");
  TORCH_CHECK_VALUE(ref.dim() == 2, "ref must be 2-D (batch, width), got ", ref.dim(), " dims");
  TORCH_CHECK_VALUE(gen.scalar_type() == ref.scalar_type(), "gen and ref must share a dtype");
  TORCH_CHECK_VALUE(gen.scalar_type() == at::kInt || gen.scalar_type() == at::kLong,
                    "gen and ref must be int32 or int64");
  TORCH_CHECK_VALUE(max_targets >= 0, "max_targets must be >= 0");
  const int64_t batch = gen.size(0), gen_width = gen.size(1), ref_width = ref.size(1);
  TORCH_CHECK_VALUE(ref.size(0) == batch, "ref batch size ", ref.size(0), " != gen batch size ", batch);
  TORCH_CHECK_VALUE(gen_width < (int64_t{1} << 28) && ref_width < (int64_t{1} << 28),
                    "widths must be < 2^28");
  GAPFIX_CHECK_SHAPE(gen_lens, batch);
  GAPFIX_CHECK_SHAPE(ref_lens, batch);
  TORCH_CHECK_VALUE(gen_lens.scalar_type() == at::kLong && ref_lens.scalar_type() == at::kLong,
                    "gen_lens and ref_lens must be int64");

  const at::Tensor g = gen.contiguous(), r = ref.contiguous();
  const at::Tensor gl = gen_lens.contiguous(), rl = ref_lens.contiguous();
  const int64_t* glp = gl.data_ptr<int64_t>();
  const int64_t* rlp = rl.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(glp[b] >= 0 && glp[b] <= gen_width, "gen_lens[", b, "] = ", glp[b],
                      " outside [0, ", gen_width, "]");
    TORCH_CHECK_VALUE(rlp[b] >= 0 && rlp[b] <= ref_width, "ref_lens[", b, "] = ", rlp[b],
                      " outside [0, ", ref_width, "]");
  }

  const auto opts = gen.options().dtype(at::kInt);
  at::Tensor distance = at::full({batch}, -1, opts);
  at::Tensor path = at::full({batch, gen_width + 1}, -1, opts);
  at::Tensor cost = at::full({batch, gen_width + 1}, -1, opts);
  at::Tensor first = at::full({batch, gen_width + 1}, -1, opts);
  at::Tensor last = at::full({batch, gen_width + 1}, -1, opts);
  at::Tensor targets = at::full({batch, gen_width + 1, max_targets}, -1, opts);
  const AlignOutputs out{distance.data_ptr<int32_t>(), path.data_ptr<int32_t>(),
                         cost.data_ptr<int32_t>(),     first.data_ptr<int32_t>(),
                         last.data_ptr<int32_t>(),
                         max_targets > 0 ? targets.data_ptr<int32_t>() : nullptr};
  const int threads = at::get_num_threads();
  if (g.scalar_type() == at::kInt) {
    align_cpu<int32_t>(g.data_ptr<int32_t>(), r.data_ptr<int32_t>(), glp, rlp, batch, gen_width,
                       ref_width, max_targets, out, threads);
  } else {
    align_cpu<int64_t>(g.data_ptr<int64_t>(), r.data_ptr<int64_t>(), glp, rlp, batch, gen_width,
                       ref_width, max_targets, out, threads);
  }
  return {distance, path, cost, first, last, targets};
}

}  // namespace
}  // namespace gapfix

TORCH_LIBRARY_FRAGMENT(gapfix, m) {
  m.def(
      "align(Tensor gen, Tensor ref, Tensor gen_lens, Tensor ref_lens, int max_targets) -> "
      "(Tensor distance, Tensor path, Tensor cost, Tensor first, Tensor last, Tensor targets)");
}

TORCH_LIBRARY_IMPL(gapfix, CPU, m) { m.impl("align", &gapfix::align_cpu_op); }
