// torch.ops.gapfix.align: schema and CPU binding of the batched prefix alignment.
// The Python wrapper (gapfix/ops/align.py) validates arguments and casts the
// lengths to int64; the checks here keep a direct call memory-safe.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "align.h"
#include "align_torch.h"

// ValueError in Python, as the CUDA binding's device checks and every argument check
#define GAPFIX_CHECK_CPU(x) TORCH_CHECK_VALUE((x).device().is_cpu(), #x " must be a CPU tensor")

namespace gapfix {
namespace {

AlignResult align_cpu_op(const at::Tensor& gen, const at::Tensor& ref, const at::Tensor& gen_lens,
                         const at::Tensor& ref_lens, int64_t max_targets) {
  GAPFIX_CHECK_CPU(gen);
  GAPFIX_CHECK_CPU(ref);
  GAPFIX_CHECK_CPU(gen_lens);
  GAPFIX_CHECK_CPU(ref_lens);
  check_align_args(gen, ref, gen_lens, ref_lens, max_targets);
  const int64_t batch = gen.size(0), gen_width = gen.size(1), ref_width = ref.size(1);

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

  AlignResult result = make_align_outputs(gen, max_targets);
  auto& [distance, path, cost, first, last, targets] = result;
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
  return result;
}

}  // namespace
}  // namespace gapfix

TORCH_LIBRARY_FRAGMENT(gapfix, m) {
  m.def(
      "align(Tensor gen, Tensor ref, Tensor gen_lens, Tensor ref_lens, int max_targets) -> "
      "(Tensor distance, Tensor path, Tensor cost, Tensor first, Tensor last, Tensor targets)");
}

TORCH_LIBRARY_IMPL(gapfix, CPU, m) { m.impl("align", &gapfix::align_cpu_op); }
