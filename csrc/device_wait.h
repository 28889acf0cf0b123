// DeviceWaiter: waits for all the work queued on one device, with a deadline.
//
// Note [Device waits with a deadline]
// Rationale: before unmapping, gpusleep must wait for every kernel and copy that may touch the memory (VMM unmap
// does not wait, docs/driver-rules.md section 7), and it cannot enumerate the streams of PyTorch, NCCL or a user,
// so the wait is device-wide: cuCtxSynchronize. But work may never finish: a collective waiting for a peer that
// died, a persistent kernel (NVSHMEM- or DeepEP-style all-to-all). An unbounded cuCtxSynchronize under the
// allocator's lock then hangs the sleep and every allocation of the process for ever (review 2026-12-06,
// finding 9). The driver has no cuCtxSynchronize with a timeout, and an event recorded on the legacy stream
// would miss non-blocking streams (PyTorch's pool streams are non-blocking).
// Approach: the cuCtxSynchronize runs on a helper thread with the device's context current, and the caller
// waits for it on a condition variable until the deadline. Running out raises DeviceWaitTimeout (a CudaError,
// CUDA_ERROR_TIMEOUT, naming the device and what was waited for) before anything was changed, so the
// transaction that asked leaves the old state (invariant 2). The abandoned wait keeps running: the next wait on
// that device first waits for it (no second thread piles up behind a stuck one), then starts a fresh
// cuCtxSynchronize for the work queued since. Limitations: a helper thread that never returns stays blocked in
// the driver (one per stuck device, not per call); the thread runs in the default GLOBAL capture mode, so a
// capture in progress refuses the wait as before (Note [Captures]).
//
// Thread safety: one DeviceWaiter per device, used under the Allocator's lock.
#pragma once

#include <cuda.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "driver_api.h"

namespace gpusleep {

class DeviceWaiter {
 public:
  enum class Outcome { kFinished, kTimedOut };

  // Waits until every piece of work queued on `context` so far has finished, or `timeout_seconds` passed.
  // On kFinished, *result is cuCtxSynchronize's answer. Never throws (but std::thread may: std::system_error).
  Outcome synchronize(CUcontext context, double timeout_seconds, CUresult* result) {
    const auto deadline =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(timeout_seconds));
    if (in_flight_ && !wait_for(*in_flight_, deadline)) return Outcome::kTimedOut;  // still stuck
    in_flight_.reset();
    auto wait = std::make_shared<Wait>();
    std::thread([wait, context] {
      CUresult answer = GPUSLEEP_CU(cuCtxSetCurrent, context);
      if (answer == CUDA_SUCCESS) answer = GPUSLEEP_CU(cuCtxSynchronize);
      std::lock_guard<std::mutex> lock(wait->mutex);
      wait->result = answer;
      wait->done = true;
      wait->finished.notify_all();
    }).detach();
    if (!wait_for(*wait, deadline)) {
      in_flight_ = std::move(wait);
      return Outcome::kTimedOut;
    }
    *result = wait->result;
    return Outcome::kFinished;
  }

  // Whether an abandoned wait is still blocked in the driver.
  bool stuck() const noexcept {
    if (!in_flight_) return false;
    std::lock_guard<std::mutex> lock(in_flight_->mutex);
    return !in_flight_->done;
  }

 private:
  struct Wait {
    mutable std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    CUresult result = CUDA_SUCCESS;
  };
  static bool wait_for(Wait& wait, std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(wait.mutex);
    return wait.finished.wait_until(lock, deadline, [&] { return wait.done; });
  }

  std::shared_ptr<Wait> in_flight_;  // a wait that ran out of time and is still (or was) blocked
};

}  // namespace gpusleep
