// curkernels._C: the fused decode kernel of y = C·(U·(R·x)) + b, in one launch.
//
// Decode (few input rows) is latency-bound: a cuBLAS chain pays two or three launches for
// microseconds of bytes. One persistent kernel, one block per SM, runs three phases separated
// by a grid barrier:
//   shrink  t = R·x    R (r×n) is cut into (rank rows × K slice) tiles over the whole grid;
//                      partial dots are summed into an fp32 workspace with atomics;
//   link    t = U·t    full U only (a diagonal U is applied while staging t);
//   expand  y = C·t+b  each warp owns output rows; t is staged in shared memory once per block,
//                      then the rows of C stream through with 16-byte loads.
// The workspace is double-buffered by an epoch counter that lives in device memory: every call
// zeroes the buffer of the next call, so no host state changes between calls and a captured
// CUDA graph replays correctly.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

namespace curkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRowsPerLaunch = 16;  // larger M is processed in launches of 16 rows
// Rank/output rows per warp in each phase: a lane keeps rows × kVectorsPerLane 16-byte loads
// in flight per chunk.
constexpr int kShrinkRowsPerWarp = 4;
constexpr int kLinkRowsPerWarp = 2;
// Each staged input value feeds ROWS weight rows: at 16 input rows the expand takes 4 rows a
// warp so that shared-memory reads do not outnumber the weight loads' work.
template <int MAXM>
__host__ __device__ constexpr int expand_rows_per_warp() { return MAXM >= 16 ? 4 : 2; }
constexpr int kVectorsPerLane = 2;
constexpr int kSyncWords = 4;  // arrivals, generation, epoch, padding
// Shared memory for staged inputs: 64 KB, so that at M ≤ 4 a whole rank or K slice fits and
// at M = 16 segments of 1024 columns do.
constexpr int kStageBytes = 64 * 1024;

enum LinkMode : int { kNoLink = 0, kDiagonalLink = 1, kFullLink = 2 };

struct DecodeParams {
  const void* x;
  const void* C;
  const void* U;
  const void* R;
  const void* bias;
  const int64_t* rows;  // gather indices into R (then the base weight), or nullptr
  void* y;
  unsigned* sync;       // [arrivals, generation, epoch]
  float* shrink_sums;   // two kMaxRowsPerLaunch × r buffers, alternating by epoch
  float* link_out;      // kMaxRowsPerLaunch × c (full U only)
  int M, n, r, c, m;
  int64_t base_rows;
  int link_mode;
  int shrink_tile_k;    // K extent of a shrink tile, a multiple of the step
  int shrink_k_tiles;
  int stage_capacity;   // columns of staged input per row of shared memory
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Sense-free grid barrier: the last block to arrive resets the arrival count and then bumps the
// generation that the others spin on, so the counters are valid again for the next barrier and
// the next launch. The grid never exceeds the number of co-resident blocks (host side).
__device__ __forceinline__ void grid_barrier(unsigned* sync, bool bump_epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* arrivals = sync;
    unsigned* generation = sync + 1;
    const unsigned seen = load_acquire(generation);
    __threadfence();
    if (atomicAdd(arrivals, 1u) == gridDim.x - 1) {
      atomicExch(arrivals, 0u);
      if (bump_epoch) atomicAdd(sync + 2, 1u);
      __threadfence();
      atomicAdd(generation, 1u);
    } else {
      while (load_acquire(generation) == seen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T, int VEC>
__device__ __forceinline__ void load_weights(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(*p);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T values[VEC];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(values[e]);
  }
}

// Inputs written earlier in this launch (by other blocks) must bypass the non-coherent L1.
__device__ __forceinline__ float load_input(const float* p) { return __ldcg(p); }
template <typename T>
__device__ __forceinline__ float load_input(const T* p) { return static_cast<float>(*p); }

// The calling warp's ROWS weight rows from first_row on: gathered through `gather` (clamped)
// when given; rows at or past num_rows are invalid and never loaded.
template <typename T, int ROWS>
struct WarpRows {
  const T* ptr[ROWS];
  bool valid[ROWS];

  __device__ WarpRows(const T* A, const int64_t* gather, int64_t num_base_rows, int64_t lda,
                      int first_row, int num_rows) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int row = first_row + i;
      valid[i] = row < num_rows;
      int64_t source = valid[i] ? row : 0;
      if (gather != nullptr && valid[i]) {
        // Indices are bound-checked on the host; clamping keeps a bad one from reading outside W.
        const int64_t index = gather[row];
        source = index < 0 ? 0 : (index >= num_base_rows ? num_base_rows - 1 : index);
      }
      ptr[i] = A + source * lda;
    }
  }
};

template <int VEC>
__host__ __device__ constexpr int step_columns() { return 32 * VEC * kVectorsPerLane; }

// Stages in[0:M, k_begin:k_end) · scale[k] as fp32 rows of `stride` columns, zero-padded, for
// the whole block. Each thread issues kStageBatch loads before its first store: one load, then
// its store, per iteration put a memory latency per element on the critical path (16 input
// rows × 512 columns is 32 elements a thread).
constexpr int kStageBatch = 8;

template <typename TIn, typename T, int MAXM>
__device__ __forceinline__ void stage_inputs(float* stage, int stride, const TIn* in,
                                             int64_t ld_in, const T* scale, int M, int k_begin,
                                             int k_end) {
  __syncthreads();  // the previous readers of the stage are done
  const int total = MAXM * stride;
  for (int base = threadIdx.x; base < total; base += kThreads * kStageBatch) {
    float v[kStageBatch];
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      const int idx = base + b * kThreads;
      const int row = idx / stride;
      const int k = k_begin + (idx - row * stride);
      v[b] = 0.f;
      if (idx < total && row < M && k < k_end) {
        v[b] = load_input(in + row * ld_in + k);
        if (scale != nullptr) v[b] *= static_cast<float>(scale[k]);
      }
    }
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      const int idx = base + b * kThreads;
      if (idx < total) stage[idx] = v[b];
    }
  }
  __syncthreads();
}

// A lane's VEC consecutive staged inputs, in 16-byte reads where VEC allows (stage rows and
// lane offsets are multiples of 4 floats then). One float at a time, lanes VEC floats apart
// would hit the same banks VEC-fold.
template <int VEC>
__device__ __forceinline__ void load_staged(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + e);
      out[e] = v.x;
      out[e + 1] = v.y;
      out[e + 2] = v.z;
      out[e + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = p[e];
  }
}

// acc[i][row] += Σ_k A_i[k] · stage[row][k − k_begin] over [k_begin, k_end): the warp streams
// its weight rows with ROWS × kVectorsPerLane 16-byte loads per lane in flight and no block
// synchronisation.
template <typename T, int VEC, int MAXM, int ROWS>
__device__ __forceinline__ void accumulate_staged(const WarpRows<T, ROWS>& rows,
                                                  const float* stage, int stride, int k_begin,
                                                  int k_end, float (&acc)[ROWS][MAXM]) {
  const int lane = threadIdx.x % 32;
  for (int k0 = k_begin; k0 < k_end; k0 += step_columns<VEC>()) {
    float a[ROWS][kVectorsPerLane][VEC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int j = 0; j < kVectorsPerLane; ++j) {
        const int k = k0 + (j * 32 + lane) * VEC;
        if (rows.valid[i] && k < k_end) {
          load_weights<T, VEC>(rows.ptr[i] + k, a[i][j]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) a[i][j][e] = 0.f;
        }
      }
    }
    const float* staged = stage + (k0 - k_begin);
#pragma unroll
    for (int j = 0; j < kVectorsPerLane; ++j) {
      const int kk = (j * 32 + lane) * VEC;  // this lane's VEC columns, contiguous in the stage
#pragma unroll
      for (int row = 0; row < MAXM; ++row) {
        float xv[VEC];
        load_staged<VEC>(staged + row * stride + kk, xv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
#pragma unroll
          for (int i = 0; i < ROWS; ++i) acc[i][row] = fmaf(a[i][j][e], xv[e], acc[i][row]);
        }
      }
    }
  }
}

// accumulate_staged over [k_begin, k_end) in segments of up to `capacity` staged columns.
template <typename T, typename TIn, int VEC, int MAXM, int ROWS>
__device__ __forceinline__ void accumulate_rows(const WarpRows<T, ROWS>& rows, const TIn* in,
                                                int64_t ld_in, const T* scale, int M,
                                                int k_begin, int k_end, float* stage,
                                                int capacity, float (&acc)[ROWS][MAXM]) {
  for (int segment = k_begin; segment < k_end; segment += capacity) {
    const int segment_end = min(k_end, segment + capacity);
    const int stride = ceil_div(segment_end - segment, step_columns<VEC>()) * step_columns<VEC>();
    stage_inputs<TIn, T, MAXM>(stage, stride, in, ld_in, scale, M, segment, segment_end);
    accumulate_staged<T, VEC, MAXM, ROWS>(rows, stage, stride, segment, segment_end, acc);
  }
}

__host__ __device__ constexpr int log2_exact(int value) {
  return value <= 1 ? 0 : 1 + log2_exact(value / 2);
}

// Warp transpose-reduction of N per-lane values (N a power of two ≤ 32): at each butterfly
// step a lane keeps half of its values, sends the other half, and adds what its partner sent,
// so N values take N − 1 + log2(32 / N) shuffles instead of 5·N. Afterwards v[0] holds the
// full sum of value (lane >> (5 − log2 N)).
template <int N, int OFFSET>
__device__ __forceinline__ void butterfly_reduce(float* v, int lane) {
  if constexpr (OFFSET > 0) {
    if constexpr (N > 1) {
      constexpr int kHalf = N / 2;
      const bool upper = lane & OFFSET;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
      }
      butterfly_reduce<kHalf, OFFSET / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFFSET);
      butterfly_reduce<1, OFFSET / 2>(v, lane);
    }
  }
}

// Reduces acc over the warp: mine[i] is then the sum of acc[i][lane_input_row(lane)].
template <int ROWS, int MAXM>
__device__ __forceinline__ void reduce_to_lanes(float (&acc)[ROWS][MAXM], float (&mine)[ROWS]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    butterfly_reduce<MAXM, 16>(acc[i], lane);
    mine[i] = acc[i][0];
  }
}

// The input row whose sums this lane holds after reduce_to_lanes, or -1 for the lanes that
// hold a duplicate: exactly one lane writes each input row's result.
template <int MAXM>
__device__ __forceinline__ int lane_input_row(int lane) {
  constexpr int kShift = 5 - log2_exact(MAXM);
  return (lane & ((1 << kShift) - 1)) == 0 ? lane >> kShift : -1;
}

// out[row, i] = A[i, :] · (in[row, :] · scale) + bias[i] for i < num_rows, each output row whole
// in one warp (no atomics). When K fits the stage, the inputs (the same for every tile) are
// staged once and the block's tiles stream without any synchronisation.
template <typename T, typename TIn, typename TOut, int VEC, int MAXM, int ROWS>
__device__ __forceinline__ void output_rows_phase(const T* A, int num_rows, int K,
                                                  const TIn* in, int64_t ld_in, const T* scale,
                                                  const T* bias, TOut* out, int64_t ld_out,
                                                  int M, float* stage, int capacity) {
  constexpr int kGroupRows = kWarps * ROWS;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int tiles = ceil_div(num_rows, kGroupRows);
  const bool staged_once = K <= capacity;
  const int stride = ceil_div(K, step_columns<VEC>()) * step_columns<VEC>();
  if (staged_once && blockIdx.x < tiles) {
    stage_inputs<TIn, T, MAXM>(stage, stride, in, ld_in, scale, M, 0, K);
  }
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int first_row = tile * kGroupRows + warp * ROWS;
    const WarpRows<T, ROWS> rows(A, nullptr, num_rows, K, first_row, num_rows);
    float acc[ROWS][MAXM] = {};
    if (staged_once) {
      accumulate_staged<T, VEC, MAXM, ROWS>(rows, stage, stride, 0, K, acc);
    } else {
      accumulate_rows<T, TIn, VEC, MAXM, ROWS>(rows, in, ld_in, scale, M, 0, K, stage, capacity,
                                               acc);
    }
    float mine[ROWS];
    reduce_to_lanes(acc, mine);
    const int input_row = lane_input_row<MAXM>(lane);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int row = first_row + i;
      if (input_row >= 0 && input_row < M && row < num_rows) {
        const float b = bias != nullptr ? static_cast<float>(bias[row]) : 0.f;
        out[input_row * ld_out + row] = static_cast<TOut>(mine[i] + b);
      }
    }
  }
}

template <typename T, int VEC, int MAXM>
__global__ void __launch_bounds__(kThreads) cur_linear_decode_kernel(DecodeParams p) {
  extern __shared__ __align__(16) float stage[];  // MAXM × p.stage_capacity fp32
  __shared__ unsigned epoch_shared;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const T* U = static_cast<const T*>(p.U);

  // Every block reads the epoch before arriving at the first barrier, whose last arriver bumps it.
  if (threadIdx.x == 0) epoch_shared = *reinterpret_cast<volatile unsigned*>(p.sync + 2);
  __syncthreads();
  const unsigned epoch = epoch_shared;
  const int sums_size = kMaxRowsPerLaunch * p.r;
  float* sums = p.shrink_sums + (epoch & 1u) * sums_size;
  float* next_sums = p.shrink_sums + ((epoch + 1u) & 1u) * sums_size;
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < sums_size; i += gridDim.x * kThreads) {
    next_sums[i] = 0.f;
  }

  // Shrink: sums[row, j] += R[j, slice] · x[row, slice] over (rank group × K slice) tiles.
  constexpr int kGroupRows = kWarps * kShrinkRowsPerWarp;
  const int shrink_tiles = ceil_div(p.r, kGroupRows) * p.shrink_k_tiles;
  for (int tile = blockIdx.x; tile < shrink_tiles; tile += gridDim.x) {
    const int first_row = (tile / p.shrink_k_tiles) * kGroupRows + warp * kShrinkRowsPerWarp;
    const int k_begin = (tile % p.shrink_k_tiles) * p.shrink_tile_k;
    const int k_end = min(p.n, k_begin + p.shrink_tile_k);
    const WarpRows<T, kShrinkRowsPerWarp> rows(static_cast<const T*>(p.R), p.rows, p.base_rows,
                                               p.n, first_row, p.r);
    float acc[kShrinkRowsPerWarp][MAXM] = {};
    accumulate_rows<T, T, VEC, MAXM, kShrinkRowsPerWarp>(rows, static_cast<const T*>(p.x), p.n,
                                                         nullptr, p.M, k_begin, k_end, stage,
                                                         p.stage_capacity, acc);
    float mine[kShrinkRowsPerWarp];
    reduce_to_lanes(acc, mine);
    const int input_row = lane_input_row<MAXM>(lane);
#pragma unroll
    for (int i = 0; i < kShrinkRowsPerWarp; ++i) {
      if (input_row >= 0 && input_row < p.M && first_row + i < p.r) {
        atomicAdd(&sums[input_row * p.r + first_row + i], mine[i]);
      }
    }
  }
  grid_barrier(p.sync, /*bump_epoch=*/true);

  const float* t = sums;
  int ld_t = p.r;
  if (p.link_mode == kFullLink) {  // link_out[row, i] = U[i, :] · sums[row, :]
    output_rows_phase<T, float, float, VEC, MAXM, kLinkRowsPerWarp>(
        U, p.c, p.r, sums, p.r, nullptr, nullptr, p.link_out, p.c, p.M, stage, p.stage_capacity);
    grid_barrier(p.sync, /*bump_epoch=*/false);
    t = p.link_out;
    ld_t = p.c;
  }
  // Expand: y[row, i] = C[i, :] · (t[row, :] · diag U) + bias[i].
  output_rows_phase<T, float, T, VEC, MAXM, expand_rows_per_warp<MAXM>()>(
      static_cast<const T*>(p.C), p.m, p.c, t, ld_t, p.link_mode == kDiagonalLink ? U : nullptr,
      static_cast<const T*>(p.bias), static_cast<T*>(p.y), p.m, p.M, stage, p.stage_capacity);
}

// Zero-initialised per (device, stream, r, c) workspace: sync words, two shrink buffers, link
// output. Kept for the process lifetime so that captured CUDA graphs keep valid pointers;
// per stream so that concurrent streams never share counters.
//
// It is made by a short-lived worker thread on a side stream: during torch.compile's CUDA-graph
// warm-up the caching allocator sends the allocations of the current thread (of the current
// stream, before torch 2.6) into the graph's private pool, and a buffer kept alive there fails
// cudagraph trees' pool check. While the current stream is being captured nothing is cached:
// each call gets a fresh zeroed buffer from the graph's pool, freed after the call like any
// temporary (its zeroing becomes part of the graph).
at::Tensor decode_workspace(const at::Tensor& like, int r, int c) {
  const int64_t floats = kSyncWords + 2 * kMaxRowsPerLaunch * r + kMaxRowsPerLaunch * c;
  const auto options = like.options().dtype(at::kFloat);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return at::zeros({floats}, options);
  }
  using Key = std::tuple<int, cudaStream_t, int, int>;
  static std::mutex mutex;
  static auto* workspaces = new std::map<Key, at::Tensor>();  // leaked: outlives CUDA teardown
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const Key key{like.get_device(), current.stream(), r, c};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = workspaces->find(key);
  if (found == workspaces->end()) {
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, like.get_device());
    at::Tensor zeroed;
    at::cuda::CUDAEvent zeroed_event;
    std::exception_ptr error;
    std::thread worker([&] {
      try {
        const c10::cuda::CUDAStreamGuard on_side(side);  // also selects the device
        zeroed = at::zeros({floats}, options);
        zeroed_event.record(side);
      } catch (...) {
        error = std::current_exception();
      }
    });
    worker.join();
    if (error) std::rethrow_exception(error);
    zeroed_event.block(current);  // the first kernel on `current` sees the zeros
    found = workspaces->emplace(key, std::move(zeroed)).first;
  }
  return found->second;
}

int multiprocessors(int device) {
  static int counts[256] = {};
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// Blocks of one instantiation that fit on the device at once, with the largest stage: the
// grid never exceeds it, so every block is resident and the grid barrier cannot deadlock.
template <typename T, int VEC, int MAXM>
int resident_blocks(int device) {
  static int per_sm[256] = {};
  if (per_sm[device] == 0) {
    const auto kernel = cur_linear_decode_kernel<T, VEC, MAXM>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kStageBytes));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[device], kernel,
                                                                 kThreads, kStageBytes));
    TORCH_CHECK(per_sm[device] > 0, "cur_linear decode kernel cannot be resident on device ",
                device);
  }
  return per_sm[device] * multiprocessors(device);
}

template <typename T, int VEC, int MAXM>
void launch_decode(DecodeParams p, int device, cudaStream_t stream) {
  constexpr int kStep = step_columns<VEC>();
  // One block per SM: enough loads in flight per SM, and few arrivals at each grid barrier.
  int grid = std::min(resident_blocks<T, VEC, MAXM>(device), multiprocessors(device));
  // Shrink tiles: enough K slices that (rank-row groups × slices) covers the grid.
  const int groups = ceil_div(p.r, kWarps * kShrinkRowsPerWarp);
  const int steps = ceil_div(p.n, kStep);
  const int wanted_slices = std::min(steps, std::max(1, grid / groups));
  p.shrink_tile_k = ceil_div(steps, wanted_slices) * kStep;
  p.shrink_k_tiles = ceil_div(p.n, p.shrink_tile_k);
  const int most_tiles = std::max({groups * p.shrink_k_tiles,
                                   ceil_div(p.c, kWarps * kLinkRowsPerWarp),
                                   ceil_div(p.m, kWarps * expand_rows_per_warp<MAXM>())});
  grid = std::max(1, std::min(grid, most_tiles));
  // Stage the longest K extent of any phase whole when it fits.
  const int widest = std::max({p.shrink_tile_k, p.r, p.c});
  const int capacity = (kStageBytes / (MAXM * static_cast<int>(sizeof(float)))) / kStep * kStep;
  p.stage_capacity = std::min(capacity, ceil_div(widest, kStep) * kStep);
  const size_t stage_bytes = static_cast<size_t>(MAXM) * p.stage_capacity * sizeof(float);
  cur_linear_decode_kernel<T, VEC, MAXM><<<grid, kThreads, stage_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_for_rows(const DecodeParams& p, int device, cudaStream_t stream) {
  if (p.M == 1) {
    launch_decode<T, VEC, 1>(p, device, stream);
  } else if (p.M <= 4) {
    launch_decode<T, VEC, 4>(p, device, stream);
  } else {
    launch_decode<T, VEC, kMaxRowsPerLaunch>(p, device, stream);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Launches of up to kMaxRowsPerLaunch of the M contiguous input rows each, with 16-byte loads when every weight row
// starts on a 16-byte boundary.
template <typename T>
void launch_all_rows(const DecodeParams& p, const at::Tensor& x, int64_t M, at::Tensor& y,
                     int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool full_link = p.link_mode == kFullLink;
  const bool vectorizable = p.n % kVec == 0 && p.c % kVec == 0 && aligned16(p.R) &&
                            aligned16(p.C) && (!full_link || (p.r % kVec == 0 && aligned16(p.U)));
  for (int64_t first = 0; first < M; first += kMaxRowsPerLaunch) {
    DecodeParams chunk = p;
    chunk.M = static_cast<int>(std::min<int64_t>(kMaxRowsPerLaunch, M - first));
    chunk.x = x.data_ptr<T>() + first * p.n;
    chunk.y = y.data_ptr<T>() + first * p.m;
    if (vectorizable) {
      launch_for_rows<T, kVec>(chunk, device, stream);
    } else {
      launch_for_rows<T, 1>(chunk, device, stream);
    }
  }
}

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim,
              "-D tensor");
}

at::Tensor cur_linear_decode(const at::Tensor& x, const at::Tensor& C,
                             const std::optional<at::Tensor>& U, const at::Tensor& R,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& rows) {
  // x is (..., n), as F.linear takes it: flattening in the caller costs host time per call
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, "x must be a CUDA tensor of shape (..., n)");
  check_operand(C, x, "C", 2);
  check_operand(R, x, "R", 2);
  const int64_t n = x.size(-1), m = C.size(0), c = C.size(1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const int64_t r = rows.has_value() ? rows->size(0) : R.size(0);
  TORCH_CHECK(R.size(1) == n, "R must have ", n, " columns");
  TORCH_CHECK(r >= 1, "the rank must be at least 1");
  TORCH_CHECK(std::max({M, n, m, c, r}) < (int64_t{1} << 31) / kMaxRowsPerLaunch,
              "cur_linear decode kernel: dimensions too large");
  int link_mode = kNoLink;
  if (U.has_value()) {
    check_operand(*U, x, "U", U->dim());
    link_mode = U->dim() == 1 ? kDiagonalLink : kFullLink;
    TORCH_CHECK(link_mode == kDiagonalLink ? (U->size(0) == r && c == r)
                                           : (U->dim() == 2 && U->size(0) == c && U->size(1) == r),
                "U must be (r,) or (c, r)");
  } else {
    TORCH_CHECK(c == r, "without U, C must have r columns");
  }
  if (bias.has_value()) {
    check_operand(*bias, x, "bias", 1);
    TORCH_CHECK(bias->size(0) == m, "bias must have ", m, " entries");
  }
  if (rows.has_value()) {
    TORCH_CHECK(rows->device() == x.device() && rows->scalar_type() == at::kLong &&
                    rows->dim() == 1 && rows->is_contiguous(),
                "rows must be a contiguous 1-D int64 tensor on ", x.device());
    TORCH_CHECK(R.size(0) >= 1, "the base weight is empty");
  }

  std::vector<int64_t> y_sizes(x.sizes().begin(), x.sizes().end());
  y_sizes.back() = m;
  at::Tensor y = at::empty(y_sizes, x.options());
  if (M == 0 || m == 0) return y;
  if (n == 0) {  // an empty input dimension: R·x = 0
    return bias.has_value() ? y.copy_(*bias) : y.zero_();  // copy_ broadcasts the bias
  }
  const at::Tensor x_rows = x.is_contiguous() ? x : x.contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = x.get_device();
  // held until the launches are queued: a capture-time buffer is a temporary of the graph
  const at::Tensor workspace_tensor = decode_workspace(x, static_cast<int>(r), static_cast<int>(c));
  float* workspace = workspace_tensor.data_ptr<float>();

  DecodeParams p{};
  p.C = C.data_ptr();
  p.U = U.has_value() ? U->data_ptr() : nullptr;
  p.R = R.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.rows = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  p.sync = reinterpret_cast<unsigned*>(workspace);
  p.shrink_sums = workspace + kSyncWords;
  p.link_out = p.shrink_sums + 2 * kMaxRowsPerLaunch * r;
  p.n = static_cast<int>(n);
  p.r = static_cast<int>(r);
  p.c = static_cast<int>(c);
  p.m = static_cast<int>(m);
  p.base_rows = R.size(0);
  p.link_mode = link_mode;

  switch (x.scalar_type()) {
    case at::kFloat: launch_all_rows<float>(p, x_rows, M, y, device, stream); break;
    case at::kHalf: launch_all_rows<at::Half>(p, x_rows, M, y, device, stream); break;
    case at::kBFloat16: launch_all_rows<at::BFloat16>(p, x_rows, M, y, device, stream); break;
    default: TORCH_CHECK(false, "cur_linear: x must be float32, float16 or bfloat16, got ",
                         x.scalar_type());
  }
  return y;
}

}  // namespace
}  // namespace curkernels

TORCH_LIBRARY(curkernels_C, m) {
  m.def("cur_linear(Tensor x, Tensor C, Tensor? U, Tensor R, Tensor? bias, Tensor? rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(curkernels_C, CUDA, m) { m.impl("cur_linear", &curkernels::cur_linear_decode); }

// A Python module with no attributes: importing it loads the library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
