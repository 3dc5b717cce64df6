// Multi-tensor apply for CUDA: one kernel launch covers many tensors. The launch's
// argument (4 KiB, or 32 KiB for lists that do not fit and where CUDA >= 12.1 allows it)
// carries, for each of its tensor slots, the address of the tensor
// in each of the Depth lists, its length, and the launch block where its chunks start
// (with the chunk they start at); each block finds its slot by binary search over those
// starts. The host planner (plan.h: plan_launches) decides the launches; a new one starts
// when the slots or the blocks fill, so launches grow with total size and tensor count
// over the slot limits, never one per tensor. Each block walks its chunk with kIlp
// elements per thread, using one vector load/store per list when every address of the
// chunk is aligned (the common case) and coalesced scalar accesses otherwise. Offsets
// are 64-bit, so tensors past 2^31 elements are fine.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda_launch.h"
#include "plan.h"

namespace fastsam {
namespace cuda {

constexpr int kIlp = 4;  // elements per thread per step

// What a launch needs to know, passed by value as its kernel argument: up to Slots tensors.
template <int Depth, int Slots>
struct TensorListMeta {
  static constexpr int kDepth = Depth;
  static constexpr int kMaxTensors = Slots;
  void* addresses[Depth][Slots];
  int64_t numels[Slots];
  int32_t slot_first_block[Slots];  // ascending; slot_first_block[0] == 0
  int32_t slot_first_chunk[Slots];
  int32_t slot_tensor[Slots];  // the tensor's position in the op's lists (stochastic rounding hashes it)
  int64_t first_block;  // global index of this launch's block 0 (for reduction partials)
  int64_t chunk_size;   // elements per block
  int32_t slots;
};

template <int Depth>
using SmallMeta = TensorListMeta<Depth, static_cast<int>(cuda_max_tensors(Depth))>;
template <int Depth>
using LargeMeta = TensorListMeta<Depth, static_cast<int>(cuda_max_tensors_large(Depth))>;

// Kernel parameters are limited to 4 KiB, or 32764 bytes from CUDA 12.1 on sm_70+; leave
// room for the op's own scalars (at most 64 bytes today).
constexpr size_t kSmallArgumentBytes = 3840, kLargeArgumentBytes = 32764 - 128;
static_assert(sizeof(SmallMeta<1>) <= kSmallArgumentBytes && sizeof(SmallMeta<2>) <= kSmallArgumentBytes &&
                  sizeof(SmallMeta<3>) <= kSmallArgumentBytes && sizeof(SmallMeta<4>) <= kSmallArgumentBytes,
              "a 4 KiB launch argument is too large");
static_assert(sizeof(LargeMeta<1>) <= kLargeArgumentBytes && sizeof(LargeMeta<2>) <= kLargeArgumentBytes &&
                  sizeof(LargeMeta<3>) <= kLargeArgumentBytes && sizeof(LargeMeta<4>) <= kLargeArgumentBytes,
              "a 32 KiB launch argument is too large");
static_assert(kCudaChunkSize % (kIlp * kCudaBlockThreads) == 0, "chunks are whole steps");

// CUDA 12.1 raised the kernel-parameter limit to 32764 bytes (for sm_70 and newer; CUDA 13
// supports nothing older). Built with an older CUDA, or for an older GPU (setup.py then
// defines FASTSAM_NO_LARGE_KERNEL_PARAMS), every launch uses the 4 KiB argument.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && !defined(FASTSAM_NO_LARGE_KERNEL_PARAMS)
#define FASTSAM_LARGE_KERNEL_PARAMS 1
#else
#define FASTSAM_LARGE_KERNEL_PARAMS 0
#endif

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

// The ops take the launch argument by reference. Today everything inlines and ptxas -v
// reports no stack frame for any kernel with or without it; __grid_constant__ keeps the
// 4 or 32 KiB struct read in place (not copied to local memory) should an op stop inlining.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7))
#define FASTSAM_GRID_CONSTANT __grid_constant__
#else
#define FASTSAM_GRID_CONSTANT
#endif

// One block per planned chunk: op(meta, slot, begin, n, block) handles elements
// [begin, begin + n) of the tensors in `slot`; `block` is its global index.
template <typename Meta, typename Op>
__global__ void __launch_bounds__(kCudaBlockThreads)
    multi_tensor_kernel(const FASTSAM_GRID_CONSTANT Meta meta, const Op op) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int slot = slot_of_block(meta.slot_first_block, meta.slots, block);  // same for the whole block
  const int64_t chunk = static_cast<int64_t>(meta.slot_first_chunk[slot]) + (block - meta.slot_first_block[slot]);
  const int64_t begin = chunk * meta.chunk_size;
  const int64_t remaining = meta.numels[slot] - begin;
  const int64_t n = remaining < meta.chunk_size ? remaining : meta.chunk_size;
  op(meta, slot, begin, n, meta.first_block + static_cast<int64_t>(block));
}

// `hint`, if not empty, follows the CUDA error in the message (what the user can do).
inline void check_launch(const char* what, const char* hint = "") {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fastsam: launching ", what, " failed: ", cudaGetErrorString(error), hint);
}

template <typename Meta, typename Op>
void launch_planned(const FlatLists& lists, const Op& op, int64_t chunk_size, cudaStream_t stream) {
  const auto launches = plan_launches(lists.numels, chunk_size, Meta::kMaxTensors, kCudaMaxBlocks);
  Meta meta;
  meta.chunk_size = chunk_size;
  for (const PlannedLaunch& launch : launches) {
    for (size_t slot = 0; slot < launch.tensors.size(); ++slot) {
      const int64_t t = launch.tensors[slot];
      for (int d = 0; d < Meta::kDepth; ++d) meta.addresses[d][slot] = lists.addresses[d][t];
      meta.numels[slot] = lists.numels[t];
      meta.slot_first_block[slot] = launch.slot_first_block[slot];
      meta.slot_first_chunk[slot] = launch.slot_first_chunk[slot];
      meta.slot_tensor[slot] = static_cast<int32_t>(t);
    }
    meta.slots = static_cast<int32_t>(launch.tensors.size());
    meta.first_block = launch.first_block;
    multi_tensor_kernel<Meta, Op><<<static_cast<unsigned>(launch.blocks), kCudaBlockThreads, 0, stream>>>(meta, op);
    check_launch("a multi-tensor kernel",
                 sizeof(Meta) <= kSmallArgumentBytes
                     ? ""
                     : ". Kernel arguments over 4 KiB need a driver for CUDA >= 12.1 and a GPU of compute "
                       "capability >= 7.0; set FASTSAM_CUDA_LARGE_PARAMS=0 to launch with 4 KiB arguments instead.");
  }
}

// Launches op over lists.addresses[0..Depth) (tensors already checked and laid out flat),
// with the 4 KiB argument when the tensors fit in it, else (where built and not switched
// off) the 32 KiB one (plan.h: cuda_slots_for).
template <int Depth, typename Op>
void multi_tensor_apply(const FlatLists& lists, const Op& op, cudaStream_t stream) {
  TORCH_CHECK(lists.depth == Depth, "multi_tensor_apply: expected ", Depth, " lists, got ", lists.depth);
  const int64_t chunk_size = cuda_chunk_size();
#if FASTSAM_LARGE_KERNEL_PARAMS
  int64_t tensors = 0;  // non-empty ones: empty tensors take no slot
  for (int64_t n : lists.numels) tensors += n > 0;
  if (cuda_slots_for(Depth, tensors, cuda_large_params_requested()) == LargeMeta<Depth>::kMaxTensors) {
    launch_planned<LargeMeta<Depth>>(lists, op, chunk_size, stream);
    return;
  }
#endif
  launch_planned<SmallMeta<Depth>>(lists, op, chunk_size, stream);
}

// ---- device helpers for the ops' block functions ----

// The helpers every op file's functors use: a value as fp32, the bit of a list index in the
// Reads/Writes masks, and a call f(T{}) with T the C++ type of a kernel dtype.
template <typename T>
__device__ __forceinline__ float load(T x) {
  return static_cast<float>(x);
}

constexpr unsigned bit(int list) { return 1u << list; }

template <typename F>
void with_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat: f(float{}); break;
    case Dtype::kHalf: f(c10::Half{}); break;
    case Dtype::kBFloat16: f(c10::BFloat16{}); break;
  }
}

template <typename T>
__device__ __forceinline__ bool is_pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// Calls fn(v) or, when fn takes it, fn(v, index) with the element's index in its tensor.
template <typename Fn, typename V>
__device__ __forceinline__ void apply(Fn& fn, V& v, int64_t index) {
  if constexpr (std::is_invocable_v<Fn&, V&, int64_t>) {
    fn(v, index);
  } else {
    fn(v);
  }
}

// Walks elements [begin, begin + n) of one chunk. For each element, the values of the
// lists in `Reads` (a bit mask over list indices) are loaded into v[d], fn updates v, and
// the lists in `Writes` are stored back from v[d].
template <typename T, unsigned Reads, unsigned Writes, typename Meta, typename Fn>
__device__ __forceinline__ void for_each_element(const Meta& meta, int slot, int64_t begin, int64_t n, Fn&& fn) {
  constexpr int Depth = Meta::kDepth;
  T* ptr[Depth];
  bool aligned = n % kIlp == 0;
#pragma unroll
  for (int d = 0; d < Depth; ++d) {
    ptr[d] = static_cast<T*>(meta.addresses[d][slot]) + begin;
    if ((Reads | Writes) & (1u << d)) aligned = aligned && is_pack_aligned(ptr[d]);
  }
  T v[kIlp][Depth];
  if (aligned) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kIlp; i < n; i += static_cast<int64_t>(blockDim.x) * kIlp) {
#pragma unroll
      for (int d = 0; d < Depth; ++d) {
        if (Reads & (1u << d)) {
          const Pack<T> p = *reinterpret_cast<const Pack<T>*>(ptr[d] + i);
#pragma unroll
          for (int k = 0; k < kIlp; ++k) v[k][d] = p.v[k];
        }
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) apply(fn, v[k], begin + i + k);
#pragma unroll
      for (int d = 0; d < Depth; ++d) {
        if (Writes & (1u << d)) {
          Pack<T> p;
#pragma unroll
          for (int k = 0; k < kIlp; ++k) p.v[k] = v[k][d];
          *reinterpret_cast<Pack<T>*>(ptr[d] + i) = p;
        }
      }
    }
  } else {
    for (int64_t i0 = 0; i0 < n; i0 += static_cast<int64_t>(blockDim.x) * kIlp) {
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (i < n) {
#pragma unroll
          for (int d = 0; d < Depth; ++d) {
            if (Reads & (1u << d)) v[k][d] = ptr[d][i];
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (i < n) apply(fn, v[k], begin + i);
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (i < n) {
#pragma unroll
          for (int d = 0; d < Depth; ++d) {
            if (Writes & (1u << d)) ptr[d][i] = v[k][d];
          }
        }
      }
    }
  }
}

// Deterministic block sum of W values per thread (fixed shuffle tree, then warp 0 over
// the per-warp sums); thread 0 stores the W results to out[0..W).
template <int W, typename Acc>
__device__ __forceinline__ void block_sum_store(const Acc (&acc)[W], float* out) {
  constexpr int kWarps = kCudaBlockThreads / 32;
  __shared__ Acc warp_sums[W][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    Acc v = acc[w];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[w][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int w = 0; w < W; ++w) {
      Acc v = lane < kWarps ? warp_sums[w][lane] : Acc(0);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) out[w] = static_cast<float>(v);
    }
  }
}

// Second phase of a reduction: one block adds the `count` per-chunk partials (W values
// each) in a fixed order, in double, and writes the W fp32 totals.
template <int W>
__global__ void __launch_bounds__(kCudaBlockThreads) finish_sum_kernel(const float* partials, int64_t count,
                                                                       float* out) {
  double acc[W];
#pragma unroll
  for (int w = 0; w < W; ++w) acc[w] = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] += partials[i * W + w];
  }
  block_sum_store<W>(acc, out);
}

}  // namespace cuda
}  // namespace fastsam
