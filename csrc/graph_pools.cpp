// GraphPools and the Allocator's graph-pool calls (Note [Shared graph pools] in graph_pools.h).
#include "graph_pools.h"

#include "allocator.h"
#include "errors.h"
#include "stream_capture.h"

namespace gpusleep {

uint64_t GraphPools::begin_capture(GraphPoolHandle handle, uint64_t capture_id, CUstream stream) {
  auto it = pools_.find(handle);
  if (it == pools_.end()) it = pools_.emplace(handle, Pool{kSharedPoolKeyBit | next_pool_number_++, 0}).first;
  ++it->second.graphs;
  end_capture(stream);  // a binding left by a capture whose end was never reported
  keys_by_capture_[capture_id] = it->second.key;
  bindings_[stream] = Binding{capture_id, it->second.key};
  return it->second.key;
}

void GraphPools::end_capture(CUstream stream) {
  auto it = bindings_.find(stream);
  if (it == bindings_.end()) return;
  keys_by_capture_.erase(it->second.capture_id);
  bindings_.erase(it);
}

uint64_t GraphPools::arena_key(uint64_t capture_id, CUstream stream) const {
  if (bindings_.empty()) return capture_id;
  auto by_capture = keys_by_capture_.find(capture_id);
  if (by_capture != keys_by_capture_.end()) return by_capture->second;
  // A stream joined to the capture has its id, so with real capture ids an unknown id is another capture, whatever
  // its stream: a binding left by a capture that ended without the glue (cuStreamEndCapture directly) must never send
  // a later capture on that stream into the pool (Note [Shared graph pools], stale bindings). Only a driver without
  // capture ids, which gives every query a new one, is matched by the stream.
  if (!capture_ids_are_per_query()) return capture_id;
  auto by_stream = bindings_.find(stream);
  return by_stream != bindings_.end() ? by_stream->second.key : capture_id;
}

uint64_t GraphPools::release(GraphPoolHandle handle) {
  auto it = pools_.find(handle);
  if (it == pools_.end()) return 0;
  if (--it->second.graphs > 0) return 0;
  const uint64_t key = it->second.key;
  pools_.erase(it);
  return key;
}

size_t GraphPools::graphs(GraphPoolHandle handle) const {
  auto it = pools_.find(handle);
  return it == pools_.end() ? 0 : it->second.graphs;
}

void Allocator::begin_graph_pool_capture(CUstream stream, GraphPoolHandle handle) {
  CallLock lock(*this);
  check_open();
  const uint64_t capture_id = capture_id_of(stream);
  if (capture_id == 0) {
    throw InvalidArgument(
        "begin_graph_pool_capture: the stream is not capturing a CUDA graph (call it right after "
        "capture_begin, with the capture stream)");
  }
  graph_pools_.begin_capture(handle, capture_id, stream);
}

void Allocator::end_graph_pool_capture(CUstream stream) {
  CallLock lock(*this);
  graph_pools_.end_capture(stream);
}

bool Allocator::release_graph_pool(GraphPoolHandle handle) {
  // A graph's finalizer may run on any thread (the HTTP loop, a metrics thread): like a free, it never waits for
  // a transition (Note [Frees never wait]). A busy lock queues the release for its holder.
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    std::lock_guard<std::mutex> queue(queued_frees_mutex_);
    queued_pool_releases_.push_back(handle);
    frees_queued_.store(true, std::memory_order_release);
    return false;
  }
  drain_queued_frees();
  const bool last = release_graph_pool_locked(handle);
  drain_queued_frees();
  return last;
}

bool Allocator::release_graph_pool_locked(GraphPoolHandle handle) {
  if (closed_) return false;  // its memory is gone already
  const uint64_t key = graph_pools_.release(handle);
  if (key == 0) return false;
  arena_.retire_graph_pool(key);
  return true;
}

size_t Allocator::graph_pool_graphs(GraphPoolHandle handle) {
  CallLock lock(*this);
  return graph_pools_.graphs(handle);
}

}  // namespace gpusleep
