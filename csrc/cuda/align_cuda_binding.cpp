// CUDA binding of torch.ops.gapfix.align (the schema is in csrc/align_ops.cpp).
// Maps each pair's ids to dense symbols with batched torch ops (sort +
// searchsorted: ids of any size cost the same), allocates the scratch in
// chunks of pairs, and calls the torch-free launcher of align_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "align.h"
#include "align_torch.h"

#define GAPFIX_CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor")

namespace gapfix {
namespace {

// Scratch per chunk of pairs (Peq + row bit-vectors + word starts): 2 GiB, or
// GAPFIX_ALIGN_SCRATCH_MB (read once; the tests use it to force chunking).
int64_t scratch_budget_bytes() {
  static const int64_t budget = [] {
    const char* mb = std::getenv("GAPFIX_ALIGN_SCRATCH_MB");
    const long long value = mb ? std::atoll(mb) : 0;
    return value > 0 ? int64_t{value} << 20 : int64_t{2} << 30;
  }();
  return budget;
}

// ref_sym[b, j]: rank of ref[b, j] among the distinct ids of ref[b, :m];
// gen_sym[b, t]: the rank of gen[b, t] in ref[b, :m], or -1 when absent.
std::tuple<at::Tensor, at::Tensor> dense_symbols(const at::Tensor& gen, const at::Tensor& ref,
                                                 const at::Tensor& ref_lens) {
  const int64_t batch = gen.size(0), gen_width = gen.size(1), ref_width = ref.size(1);
  const auto int_opts = gen.options().dtype(at::kInt);
  if (ref_width == 0) {
    return {at::full({batch, gen_width}, -1, int_opts), at::empty({batch, 0}, int_opts)};
  }
  const at::Tensor gen64 = gen.to(at::kLong).contiguous();
  const at::Tensor ref64 = ref.to(at::kLong);
  const at::Tensor cols = at::arange(ref_width, ref64.options());
  // Padding sorts last (a stable sort keeps a real id equal to the sentinel first).
  const at::Tensor keys =
      ref64.masked_fill(cols.unsqueeze(0) >= ref_lens.unsqueeze(1), std::numeric_limits<int64_t>::max());
  auto [sorted, order] = keys.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor is_new = at::ones_like(sorted);
  if (ref_width > 1) {
    is_new.slice(1, 1).copy_(sorted.slice(1, 1).ne(sorted.slice(1, 0, ref_width - 1)));
  }
  const at::Tensor rank = is_new.cumsum(1).sub_(1);
  const at::Tensor ref_sym = at::empty_like(rank).scatter_(1, order, rank).to(at::kInt).contiguous();
  at::Tensor gen_sym;
  if (gen_width == 0) {
    gen_sym = at::empty({batch, 0}, int_opts);
  } else {
    const at::Tensor pos = at::searchsorted(sorted, gen64);
    const at::Tensor at_pos = pos.clamp_max(ref_width - 1);
    const at::Tensor found = pos.lt(ref_lens.unsqueeze(1)).logical_and_(sorted.gather(1, at_pos).eq(gen64));
    gen_sym = at::where(found, rank.gather(1, at_pos), -1).to(at::kInt).contiguous();
  }
  return {gen_sym, ref_sym};
}

AlignResult align_cuda_op(const at::Tensor& gen, const at::Tensor& ref, const at::Tensor& gen_lens,
                          const at::Tensor& ref_lens, int64_t max_targets) {
  GAPFIX_CHECK_CUDA(gen);
  GAPFIX_CHECK_CUDA(ref);
  GAPFIX_CHECK_CUDA(gen_lens);
  GAPFIX_CHECK_CUDA(ref_lens);
  check_align_args(gen, ref, gen_lens, ref_lens, max_targets);
  const int64_t batch = gen.size(0), gen_width = gen.size(1), ref_width = ref.size(1);
  const c10::cuda::CUDAGuard guard(gen.device());

  AlignResult result = make_align_outputs(gen, max_targets);
  auto& [distance, path, cost, first, last, targets] = result;
  if (batch == 0) return result;

  const at::Tensor gl = gen_lens.contiguous(), rl = ref_lens.contiguous();
  auto [gen_sym, ref_sym] = dense_symbols(gen, ref, rl);

  const int64_t words = (ref_width + 63) / 64;
  const int64_t per_pair = ref_width * (words + 1) * 8 + gen_width * words * 20;
  const int64_t chunk = per_pair == 0 ? batch : std::clamp<int64_t>(scratch_budget_bytes() / per_pair, 1, batch);
  const auto opts = gen.options().dtype(at::kInt);
  const auto long_opts = gen.options().dtype(at::kLong);
  at::Tensor peq = at::empty({std::max<int64_t>(1, chunk * ref_width * (words + 1))}, long_opts);
  at::Tensor bits = at::empty({std::max<int64_t>(1, chunk * gen_width * words * 2)}, long_opts);
  at::Tensor starts = at::empty({std::max<int64_t>(1, chunk * gen_width * words)}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = gen_width + 1;
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t count = std::min(chunk, batch - b0);
    const int rc = gapfix_align_cuda_launch(
        gen_sym.data_ptr<int32_t>() + b0 * gen_width, ref_sym.data_ptr<int32_t>() + b0 * ref_width,
        gl.data_ptr<int64_t>() + b0, rl.data_ptr<int64_t>() + b0, count, gen_width, ref_width,
        max_targets, reinterpret_cast<uint64_t*>(peq.data_ptr<int64_t>()),
        reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()), starts.data_ptr<int32_t>(),
        distance.data_ptr<int32_t>() + b0, path.data_ptr<int32_t>() + b0 * rows,
        cost.data_ptr<int32_t>() + b0 * rows, first.data_ptr<int32_t>() + b0 * rows,
        last.data_ptr<int32_t>() + b0 * rows,
        max_targets > 0 ? targets.data_ptr<int32_t>() + b0 * rows * max_targets : nullptr, stream);
    TORCH_CHECK(rc == 0, "gapfix.align CUDA launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(rc)));
  }
  return result;
}

}  // namespace
}  // namespace gapfix

TORCH_LIBRARY_IMPL(gapfix, CUDA, m) { m.impl("align", &gapfix::align_cuda_op); }
