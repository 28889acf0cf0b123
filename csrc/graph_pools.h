// GraphPools: which CUDA graph memory pool each global-mode capture allocates from (torch.cuda.graph(pool=...)).
//
// Note [Shared graph pools]
// Rationale: in global mode gpusleep is PyTorch's allocator, and a block allocated while a stream captures belongs to
// the graph (Note [Caching arena]: replays may write it at any time). Keyed by the capture alone, every graph paid
// for its own activations and none was ever given back, so a server capturing dozens of batch sizes (vLLM, SGLang)
// held dozens of graphs' memory. PyTorch's caching allocator lets captures share a private pool
// (torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle()) or pool=other_graph.pool()) and frees it with its last
// graph. Approach, PyTorch's rule for private pools:
//   - the torch glue (python/gpusleep/torch_glue.py) wraps CUDAGraph.capture_begin: a capture without a pool gets a
//     fresh handle (what PyTorch does itself), and once capturing, begin_capture binds the capture (its driver id and
//     its stream) to the pool of that handle, made on first use; the pool counts one more graph;
//   - every allocation of a bound capture goes to the arena pools keyed by the graph pool's key instead of the
//     capture id, so a block freed inside a capture of pool P, or after that capture ended, may be reused by a later
//     capture into P, and by nothing else: a non-capture allocation never gets a block of a live pool;
//   - CUDAGraph.reset, or the graph's destruction, calls release once per captured graph; when the pool's last
//     graph is gone its key is retired in the arena: its free segments become ordinary cache that empty_cache(), the
//     out-of-memory retry and a sleep give back to the driver, and blocks still live (a graph's output kept by
//     the caller) join them when freed. Retiring changes no mapping, so it needs no device wait and may run from a
//     finalizer. A later capture that names the same handle gets a new pool.
// The hooks PyTorch gives a pluggable allocator for this (CUDAPluggableAllocator::set_begin_allocate_to_pool,
// set_end_allocate_to_pool, set_release_pool) are settable from C++ only, which would mean linking libtorch.
// Shared-pool keys have the top bit set, so they never equal a capture id (driver ids are small counters).
// A graph's finalizer may run on any thread, during a sleep too: release never waits for the allocator's lock; when
// it is busy the release is queued with the frees and done by the lock's holder (Note [Frees never wait]).
// Stale bindings: a capture ended without the glue (torch._C._CUDAGraph.capture_end, cuStreamEndCapture) leaves its
// binding until the next capture_begin on its stream; an allocation is matched to a binding by its capture id only,
// so a later capture on that stream never lands in the pool (whose retirement would free memory its graph uses).
// Limitations: captures begun without the glue (cuStreamBeginCapture directly, or torch's _CUDAGraph base class)
// keep one pool per capture, held for the process, as before. A driver without capture ids (stream_capture.h) is
// matched by the stream instead, so there a capture begun without the glue on a stream whose glued capture ended
// without the glue still joins that capture's pool. Like PyTorch, sharing assumes the graphs of one pool
// do not replay concurrently and that outputs a later graph must not overwrite are kept alive by the caller.
//
// Not thread-safe: the Allocator calls it under its lock.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>

namespace gpusleep {

// torch's MempoolId_t: the pair torch.cuda.graph_pool_handle() and CUDAGraph.pool() return.
using GraphPoolHandle = std::pair<uint64_t, uint64_t>;

class GraphPools {
 public:
  static constexpr uint64_t kSharedPoolKeyBit = uint64_t{1} << 63;

  // Binds the capture (capture_id on `stream`) to the pool of `handle`, made on first use; the pool counts one graph
  // more. Returns the pool's arena key.
  uint64_t begin_capture(GraphPoolHandle handle, uint64_t capture_id, CUstream stream);
  // Forgets the binding of the capture on `stream` (its graph still counts until release).
  void end_capture(CUstream stream);
  // The arena key of an allocation on `stream` while it captures as capture_id: the pool bound to that capture id
  // (to the stream, where the driver has no capture ids), else capture_id.
  uint64_t arena_key(uint64_t capture_id, CUstream stream) const;
  // One graph of the pool is gone. Returns the pool's arena key when it was the last (the handle is forgotten),
  // else 0 (also for an unknown handle).
  uint64_t release(GraphPoolHandle handle);
  // Graphs counted by the pool of `handle` (0: no such pool).
  size_t graphs(GraphPoolHandle handle) const;
  size_t pools() const noexcept { return pools_.size(); }

 private:
  struct Pool {
    uint64_t key;
    size_t graphs;
  };
  struct Binding {
    uint64_t capture_id;
    uint64_t key;
  };
  std::map<GraphPoolHandle, Pool> pools_;
  std::map<uint64_t, uint64_t> keys_by_capture_;  // capture id -> arena key, while the capture runs
  std::map<CUstream, Binding> bindings_;          // capturing stream -> its binding (drivers without capture ids)
  uint64_t next_pool_number_ = 1;
};

}  // namespace gpusleep
