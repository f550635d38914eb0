// A tiny CPU stand-in for the CUDA runtime, enough to run csrc/cuda/align_cuda.cu
// on a machine without a GPU (tests/test_align_cuda_build.py): every GPU thread
// of a block is a std::thread; __syncthreads and warp shuffles are barriers.
// Launches `k<<<g, b, 0, s>>>(args)` are rewritten by the test into
// `emu_launch(k, g, b, args)`. Slow, and only as faithful as its barriers, but
// it runs the kernels' indexing, pipelining and bit logic on real inputs.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __shared__ static  // one copy for all blocks: the kernels only fill identical read-only tables

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

struct ulonglong2 {
  unsigned long long x, y;
};
inline ulonglong2 make_ulonglong2(unsigned long long x, unsigned long long y) { return {x, y}; }
struct Dim3 {
  unsigned x;
};

inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != generation_; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct EmuBlock {
  explicit EmuBlock(int threads) : block_barrier(threads), slots(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w)
      warp_barriers.emplace_back(new Barrier(std::min(32, threads - 32 * w)));
  }
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<int> slots;
};

inline thread_local Dim3 threadIdx, blockIdx, blockDim;
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block_barrier.wait(); }

// Whole-warp shuffle: every lane of the warp must call it (as on the GPU,
// where the kernels use the full mask).
inline int __shfl_up_sync(unsigned, int value, int delta) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  Barrier& barrier = *emu_block->warp_barriers[warp];
  emu_block->slots[threadIdx.x] = value;
  barrier.wait();
  const int out = lane >= delta ? emu_block->slots[threadIdx.x - delta] : value;
  barrier.wait();
  return out;
}

inline int __shfl_sync(unsigned, int value, int src_lane) {
  const int warp = threadIdx.x / 32;
  Barrier& barrier = *emu_block->warp_barriers[warp];
  emu_block->slots[threadIdx.x] = value;
  barrier.wait();
  const int out = emu_block->slots[32 * warp + (src_lane & 31)];
  barrier.wait();
  return out;
}

template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, unsigned grid, unsigned block, Args... args) {
  for (unsigned b = 0; b < grid; ++b) {
    EmuBlock ctx(static_cast<int>(block));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        emu_block = &ctx;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
}
